"""`dispatch agent-exec ATTEMPT`: the wrapper inside the task's tmux window (SPEC §3 step 4-5).

It acknowledges the spawn, runs the agent's argv (never a shell string), heartbeats,
forwards signals, and records the exit and outcome. Its writes to the task are
fenced: they apply only while its attempt is current and `running`.

Every `dispatch run` waits for its acknowledgement, so everything up to the agent's
start (and the heartbeats) are single statements that need no SQLAlchemy; the exit is
recorded through the models (`agent_exit`), loaded once the agent has ended.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from dispatch.app import App
from dispatch.errors import DispatchError
from dispatch.lifecycle import AttemptState, Status
from dispatch.services.naming import prompt_path
from dispatch.store.statements import (
    WrapperStart,
    acknowledge,
    heartbeat,
    record_agent_pid,
    wrapper_start,
)

# How long an agent may outlive a forwarded SIGTERM or SIGHUP before it is killed.
KILL_GRACE_SECONDS = 2.0


def say(text: str) -> None:
    """Print in the pane; after a hangup the terminal is gone, which must not stop us."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"[dispatch] {text}\n")
        sys.stderr.flush()


def agent_exec(app: App, attempt_id: int) -> int:
    """Run the agent of one attempt; the return value is the wrapper's exit status."""
    settings = app.settings
    start = wrapper_start(app.direct, attempt_id)
    if start.state != AttemptState.STARTING.value:
        say(f"attempt {attempt_id} is {start.state}; the agent is not started")
        return 0

    received: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for proc in child:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signum)

    # Installed before the acknowledgement: a hangup from the dispatcher's undo must not
    # be lost between acknowledging and starting the agent.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)

    try:
        argv, worktree = _prepare(app, start)
    except DispatchError as exc:
        _give_up(app, attempt_id, exc.message)
        say(exc.message)
        return 127 if isinstance(exc, _NotFound) else 1
    if received:
        _give_up(app, attempt_id, f"wrapper interrupted by {_signame(received[0])} before starting")
        return 128 + received[0]
    acknowledged = acknowledge(app.direct, attempt_id, os.getpid(), datetime.now(UTC))
    if not acknowledged:  # the dispatcher gave up first: it decides, we leave quietly
        say(f"attempt {attempt_id} was abandoned by its dispatcher; the agent is not started")
        return 0
    if received:
        # The dispatcher is undoing (or someone closed the window): do not start now.
        code = 128 + received[0]
        _finish(app, attempt_id, code, interrupted=True)
        return code

    env = dict(os.environ)
    env.update(
        DISPATCH_TASK_ID=str(start.task_id),
        DISPATCH_ATTEMPT_ID=str(attempt_id),
        DISPATCH_DB=settings.database,
        DISPATCH_WORKTREE=str(worktree),
        DISPATCH_BRANCH=start.branch or "",
    )
    try:
        proc = subprocess.Popen(argv, cwd=worktree, env=env)
    except OSError as exc:
        # The agent never ran: that is a failed dispatch, which the dispatcher rolls back.
        message = f"cannot start agent command {argv[0]!r}: {exc.strerror or exc}"
        say(message)
        _give_up(app, attempt_id, message, acknowledged=True)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    child.append(proc)
    if received:  # arrived while the agent was being started
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(received[-1])
    # Ctrl-C in the pane reaches the agent directly (same foreground process group); the
    # wrapper stays to record the exit. Ignored only now, so the agent keeps the default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    recorded = record_agent_pid(app.direct, attempt_id, proc.pid)
    if not recorded:
        # Fenced while starting: the dispatcher rolled this attempt back; the agent goes.
        say(f"attempt {attempt_id} was rolled back by its dispatcher; stopping the agent")
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(app, attempt_id, proc, stop), name="heartbeat", daemon=True
    )
    beat.start()
    code = _wait(proc, received)
    stop.set()
    beat.join(timeout=5)
    interrupted = any(s in (signal.SIGTERM, signal.SIGHUP) for s in received)
    status = _finish(app, attempt_id, code, interrupted=interrupted)
    say(f"agent exited with {code}; task {start.task_id} is {status or 'unchanged (superseded)'}")
    return code


class _NotFound(DispatchError):
    """The agent's command is not on PATH."""


def _signame(signum: int) -> str:
    return signal.Signals(signum).name


def _prepare(app: App, start: WrapperStart) -> tuple[list[str], Path]:
    """The agent's argv (placeholders filled inside single elements) and its directory."""
    settings = app.settings
    profile = settings.agent(start.agent)
    worktree = Path(start.worktree or ".")
    values = {
        "prompt": start.prompt,
        "prompt_file": str(prompt_path(app, start.attempt_id)),
        "task_id": str(start.task_id),
        "attempt_id": str(start.attempt_id),
        "worktree": str(worktree),
        "branch": start.branch or "",
        "session_id": start.session_id or "",
    }
    argv = profile.argv(values, resume=start.resume)
    # Looked up from the worktree, where a relative command ("./run-agent") is meant to be.
    if _which(argv[0], worktree) is None:
        raise _NotFound(f"agent command {argv[0]!r} not found on PATH")
    pane = os.environ.get("TMUX_PANE")
    if pane:
        settings.logs_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        app.terminal.pipe_pane(pane, settings.logs_dir / f"attempt-{start.attempt_id}.log")
    return argv, worktree


def _which(command: str, cwd: Path) -> str | None:
    if os.sep in command:
        path = command if os.path.isabs(command) else os.path.join(cwd, command)
        return path if os.access(path, os.X_OK) and os.path.isfile(path) else None
    return shutil.which(command)


def _wait(proc: subprocess.Popen[bytes], received: list[int]) -> int:
    """The agent's exit status; an agent that outlives a forwarded SIGTERM or SIGHUP by
    KILL_GRACE_SECONDS is killed: a task is never reported stopped while it still works."""
    signalled_at: float | None = None
    while True:
        try:
            # A timeout, not a plain wait: a signal handler cannot end a blocking wait.
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if not received:
                continue
            now = time.monotonic()
            if signalled_at is None:
                signalled_at = now
            elif now - signalled_at > KILL_GRACE_SECONDS:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N


def _heartbeat(
    app: App, attempt_id: int, proc: subprocess.Popen[bytes], stop: threading.Event
) -> None:
    """Prove liveness to other hosts' sweeps, and honour a cancel made from another host."""
    while not stop.wait(app.settings.heartbeat_interval):
        try:
            cancelled = heartbeat(app.direct, attempt_id, datetime.now(UTC))
        except Exception:  # a missed beat is harmless; the next one retries
            continue
        if cancelled:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()


def _give_up(app: App, attempt_id: int, message: str, *, acknowledged: bool = False) -> None:
    from dispatch.services.agent_exit import give_up

    give_up(app, attempt_id, message, acknowledged=acknowledged)


def _finish(app: App, attempt_id: int, code: int, *, interrupted: bool) -> Status | None:
    from dispatch.services.agent_exit import finish

    return finish(app, attempt_id, code, interrupted=interrupted)
