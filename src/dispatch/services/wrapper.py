"""`dispatch agent-exec ATTEMPT`: the wrapper inside the task's tmux window (SPEC §3 step 4-5).

It acknowledges the spawn, runs the agent's argv (never a shell string), heartbeats,
forwards signals, and records the exit and outcome. Its writes to the task are
fenced: they apply only while its attempt is current and `running`.

Every `dispatch run` waits for its acknowledgement, so the wrapper imports little and
its statements run on the standard library's sqlite3 where they can (`store.direct`).
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
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TypeVar

from dispatch.adapters.processes import (
    attempt_marker,
    attempt_processes,
    become_subreaper,
    reap_adopted,
    stop_processes,
)
from dispatch.adapters.wakeup import address, nudge
from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import DispatchError
from dispatch.lifecycle import Action, AttemptState, Completion, Outcome, Status, derive_outcome
from dispatch.lifecycle import next_status as lifecycle_next
from dispatch.services.naming import prompt_path
from dispatch.store import statements as st
from dispatch.store.direct import Tx
from dispatch.store.statements import (
    AttemptRow,
    TaskRow,
    WrapperStart,
    acknowledge,
    heartbeat_and_cancel_asked,
    record_agent_pid,
    wrapper_start,
)

T = TypeVar("T")
# How long an agent may outlive a forwarded SIGTERM or SIGHUP before it is killed.
KILL_GRACE_SECONDS = 2.0
# How long each signal gives what an exited agent left running, before the next one.
LEFTOVER_GRACE_SECONDS = 1.0
# How long the wrapper keeps trying to record an exit when the database is busy.
RECORD_PATIENCE_SECONDS = 120.0


def say(text: str) -> None:
    """Print in the pane; after a hangup the terminal is gone, which must not stop us."""
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.write(f"[dispatch] {text}\n")
        sys.stderr.flush()


def agent_exec(app: App, attempt_id: int) -> int:
    """Run the agent of one attempt; the return value is the wrapper's exit status."""
    settings = app.settings
    start = app.direct.read(lambda tx: wrapper_start(tx, attempt_id))
    if start.state != AttemptState.STARTING.value:
        say(f"attempt {attempt_id} is {start.state}; the agent is not started")
        return 0

    received: list[int] = []
    child: list[subprocess.Popen[bytes]] = []

    def forward(signum: int, _frame: FrameType | None) -> None:
        received.append(signum)
        for proc in child:
            # The agent leads its own group: the signal reaches all of it. Only while the
            # agent is not yet reaped: after that its number may name a stranger's group.
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signum)

    # Installed before the acknowledgement: a hangup from the dispatcher's undo must not
    # be lost between acknowledging and starting the agent.
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)

    try:
        argv, worktree = _prepare(app, start)
    except DispatchError as exc:
        give_up(app, attempt_id, exc.message)
        say(exc.message)
        return 127 if isinstance(exc, _NotFound) else 1
    if received:
        give_up(app, attempt_id, f"wrapper interrupted by {_signame(received[0])} before starting")
        return 128 + received[0]
    now = datetime.now(UTC)
    acknowledged = app.direct.write(lambda tx: acknowledge(tx, attempt_id, os.getpid(), now))
    if not acknowledged:  # the dispatcher gave up first: it decides, we leave quietly
        say(f"attempt {attempt_id} was abandoned by its dispatcher; the agent is not started")
        return 0
    if received:
        # The dispatcher is undoing (or someone closed the window): do not start now.
        code = 128 + received[0]
        finish(app, attempt_id, code, interrupted=True)
        return code

    env = dict(os.environ)
    env.update(
        DISPATCH_TASK_ID=str(start.task_id),
        DISPATCH_ATTEMPT_ID=str(attempt_id),
        DISPATCH_DB=settings.database,
        DISPATCH_WORKTREE=str(worktree),
        DISPATCH_BRANCH=start.branch or "",
    )
    tty = _terminal()
    become_subreaper()  # before anything the agent starts can be orphaned
    try:
        # The agent leads a process group of its own, so that stopping it stops everything
        # it started; in the terminal's foreground, so the keyboard and Ctrl-C reach it.
        proc = subprocess.Popen(
            argv,
            cwd=worktree,
            env=env,
            process_group=0,
            preexec_fn=None if tty is None else partial(_take_terminal, tty),
        )
    except OSError as exc:
        # The agent never ran: that is a failed dispatch, which the dispatcher rolls back.
        message = f"cannot start agent command {argv[0]!r}: {exc.strerror or exc}"
        say(message)
        give_up(app, attempt_id, message, acknowledged=True)
        return 127 if isinstance(exc, FileNotFoundError) else 126
    child.append(proc)
    if received:  # arrived while the agent was being started
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, received[-1])
    # The wrapper stays to record the exit, whoever presses Ctrl-C where. Ignored only
    # now, so the agent keeps the default.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    marker = attempt_marker(attempt_id, settings.database)

    def agent_processes() -> set[int]:
        return attempt_processes(marker, group=proc.pid, adopter=os.getpid())

    cancelled = threading.Event()
    recorded = app.direct.write(lambda tx: record_agent_pid(tx, attempt_id, proc.pid))
    nudge(address(settings.database, attempt_id))  # the dispatcher waits for this write
    if not recorded:
        # Fenced while starting: the dispatcher rolled this attempt back; the agent goes.
        say(f"attempt {attempt_id} was rolled back by its dispatcher; stopping the agent")
        cancelled.set()
    stop = threading.Event()
    beat = threading.Thread(
        target=_heartbeat, args=(app, attempt_id, cancelled, stop), name="heartbeat", daemon=True
    )
    beat.start()
    code = _wait(proc, received, cancelled, agent_processes)
    # Whatever the agent left running (background jobs, servers, workers) goes with it:
    # nothing may work on a task once its attempt is recorded as ended.
    left = stop_processes(agent_processes, grace=LEFTOVER_GRACE_SECONDS)
    if left:
        say(f"processes {', '.join(map(str, sorted(left)))} of the agent would not stop")
    if tty is not None:
        _take_terminal(tty)  # back to the wrapper, to print its last line
    stop.set()
    beat.join(timeout=5)
    interrupted = any(s in (signal.SIGTERM, signal.SIGHUP) for s in received)
    status = finish(app, attempt_id, code, interrupted=interrupted)
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


def _terminal() -> int | None:
    """The pane's terminal (the wrapper's stdin), if it runs in one."""
    try:
        return 0 if os.isatty(0) else None
    except OSError:
        return None


def _take_terminal(fd: int) -> None:
    """Make the calling process's group the terminal's foreground group.

    Run in the agent between fork and exec, and in the wrapper once the agent is gone.
    A background group may only do this with SIGTTOU ignored, and an ignored signal
    would stay ignored across exec, so the previous disposition is put back."""
    previous = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        pass  # the terminal is gone (a hangup): nobody is there to type
    finally:
        signal.signal(signal.SIGTTOU, previous)


def _wait(
    proc: subprocess.Popen[bytes],
    received: list[int],
    cancelled: threading.Event,
    agent_processes: Callable[[], set[int]],
) -> int:
    """The agent's exit status. A cancel seen by the heartbeat stops the agent's processes
    (SIGINT, SIGTERM, SIGKILL); an agent that outlives a forwarded SIGTERM or SIGHUP by
    KILL_GRACE_SECONDS is killed: a task is never reported stopped while it still works."""
    signalled_at: float | None = None
    stopping = False
    while True:
        try:
            # A timeout, not a plain wait: a signal handler cannot end a blocking wait.
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            reap_adopted(keep=proc.pid)
            if cancelled.is_set() and not stopping:
                stopping = True
                stop_processes(agent_processes, grace=KILL_GRACE_SECONDS)
                continue
            if not received:
                continue
            now = time.monotonic()
            if signalled_at is None:
                signalled_at = now
            elif now - signalled_at > KILL_GRACE_SECONDS:
                stop_processes(agent_processes, grace=0, signals=(signal.SIGKILL,))
    return 128 - code if code < 0 else code  # killed by signal N: the shell's 128+N


def _heartbeat(
    app: App, attempt_id: int, cancelled: threading.Event, stop: threading.Event
) -> None:
    """Prove liveness to other hosts' sweeps, and honour a cancel made from another host."""

    def beat(tx: Tx) -> bool:
        return heartbeat_and_cancel_asked(tx, attempt_id, datetime.now(UTC))

    while not stop.wait(app.settings.heartbeat_interval):
        try:
            if app.direct.write(beat):
                cancelled.set()
        except Exception:  # a missed beat is harmless; the next one retries
            continue


# -- how the agent ended, or why it never started ------------------------------------------


def patiently(work: Callable[[], T]) -> T:
    """Retry a database write until it lands: an unrecorded exit would leave a lie behind."""
    deadline = time.monotonic() + RECORD_PATIENCE_SECONDS
    while True:
        try:
            return work()
        except DispatchError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def _load(tx: Tx, attempt_id: int) -> tuple[AttemptRow, TaskRow]:
    attempt = st.get_attempt(tx, attempt_id)
    return attempt, st.get_task(tx, attempt.task_id)


def give_up(app: App, attempt_id: int, message: str, *, acknowledged: bool = False) -> None:
    """The agent cannot start: end the attempt so the dispatcher rolls back at once.

    The task itself is left to the dispatcher (or, if it died, to the sweep): a failed
    start is a failed dispatch, not a failed agent.
    """
    expected = [AttemptState.RUNNING] if acknowledged else [AttemptState.STARTING]
    patiently(
        lambda: app.direct.write(
            lambda tx: st.end_failed_dispatch(tx, attempt_id, expected=expected, error=message)
        )
    )
    nudge(address(app.settings.database, attempt_id))


def finish(app: App, attempt_id: int, code: int, *, interrupted: bool) -> Status | None:
    """Record the exit and outcome; change the task only if this attempt still owns it."""
    attempt, task = patiently(lambda: app.direct.read(lambda tx: _load(tx, attempt_id)))
    profile = app.settings.agents.get(task.agent)
    completion = profile.completion if profile else Completion.EXIT
    ahead = 0
    if completion is Completion.COMMITS and code == 0 and attempt.branch:
        try:
            ahead = app.worktrees.commits_ahead(Path(task.repo), task.base_ref, attempt.branch)
        except DispatchError as exc:
            say(f"cannot count commits: {exc.message}")
    outcome = derive_outcome(
        code,
        completion,
        signalled=attempt.done_signalled_at is not None,
        commits_ahead=ahead,
        cancelled=attempt.cancel_requested_at is not None,
        interrupted=interrupted,
    )
    return patiently(lambda: app.direct.write(lambda tx: _record(tx, attempt_id, code, outcome)))


def _record(tx: Tx, attempt_id: int, code: int, outcome: Outcome) -> Status | None:
    now = utcnow()
    ended = st.move_attempt(
        tx,
        attempt_id,
        expected=[AttemptState.RUNNING],
        target=AttemptState.ENDED,
        outcome=outcome.value,
        exit_code=code,
        ended_at=now,
    )
    attempt = st.get_attempt(tx, attempt_id)
    task = st.get_task(tx, attempt.task_id)
    if not ended:
        # Reaped or superseded: record our own exit, never the task's status.
        if attempt.exit_code is None:
            st.update_attempt(tx, attempt_id, exit_code=code)
        st.record_event(
            tx,
            "late-exit",
            task_id=task.id,
            attempt_id=attempt_id,
            exit_code=code,
            outcome=outcome.value,
        )
        return None
    if task.status != Status.IN_PROGRESS.value or task.current_attempt_id != attempt_id:
        return None
    target = lifecycle_next(Status.IN_PROGRESS, Action.FINISH, outcome=outcome, task_id=task.id)
    error = None if outcome is Outcome.SUCCESS else f"agent {outcome.value} (exit {code})"
    if not st.release_task(
        tx,
        task.id,
        attempt_id=attempt_id,
        target=target,
        kind="finished",
        columns={"last_error": error},
        detail={"exit_code": code, "outcome": outcome.value},
    ):
        return None
    return target
