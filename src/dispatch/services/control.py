"""Acting on a task that runs: cancel, close (with cascade), done, logs, attach."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from dispatch.adapters.processes import (
    attempt_marker,
    attempt_processes,
    command_line,
    stop_processes,
)
from dispatch.adapters.protocols import Pane
from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import Conflict, NotFound, ToolFailed, UsageError
from dispatch.lifecycle import Action, AttemptState, Outcome, Status, next_status
from dispatch.services.naming import wrapper_marker
from dispatch.services.panes import Panes
from dispatch.services.tasks import TaskView
from dispatch.store import statements as st
from dispatch.store.direct import Tx
from dispatch.store.statements import AttemptRow, TaskRow

# How long an agent gets to stop after C-c, and then after its window is killed.
CANCEL_GRACE_SECONDS = 5.0
# After the window is killed, the wrapper gives its agent 2 s (wrapper.KILL_GRACE_SECONDS)
# before SIGKILL, then records the cancel: wait for that, with room to spare.
KILL_GRACE_SECONDS = 6.0
# What each signal gives the agent's processes when cancel has to send them itself.
STOP_GRACE_SECONDS = 2.0
# How long `logs --follow` keeps reading after the attempt ended, for the last lines.
FOLLOW_DRAIN_SECONDS = 2.0


def _current_attempt(tx: Tx, task: TaskRow) -> AttemptRow | None:
    if task.current_attempt_id is None:
        return None
    return st.get_attempt(tx, task.current_attempt_id)


@dataclass
class _Plan:
    task: TaskRow
    attempt: AttemptRow | None
    notices: list[str]
    # The task's last attempt: what still runs of it after it ended here is stopped.
    last: AttemptRow | None = None
    # Why the status graph refuses the cancel, said only if nothing was left to stop.
    refusal: Conflict | None = None


def cancel_task(
    app: App, task_id: int, *, reason: str | None = None, expected_attempt: int | None = None
) -> TaskView:
    """Stop the agent (Ctrl-C, the window's hangup, then its processes), and only once
    none of them is left record the attempt and task `cancelled`; idempotent. With
    `expected_attempt`, only while the task's latest attempt is that one.

    Processes of the last attempt that run on after it ended here (its wrapper killed
    outright, its agent deaf to the hangup) are stopped too, whatever the status; the
    status, which says how the attempt ended, stays."""

    def request(tx: Tx) -> _Plan:
        task = st.get_task(tx, task_id)
        if expected_attempt is not None:
            st.expect_latest_attempt(tx, task, expected_attempt)
        status = Status(task.status)
        if status is Status.CANCELLED:
            return _Plan(
                task, None, [f"task {task_id} is already cancelled"], st.latest_attempt(tx, task_id)
            )
        if status is Status.READY:
            target = next_status(status, Action.CANCEL, task_id=task_id)
            if not st.move_task(tx, task_id, expected=status, target=target):
                raise Conflict(f"task {task_id} changed while cancelling it; try again")
            st.record_event(
                tx,
                "cancelled",
                task_id=task_id,
                from_status=status,
                to_status=target,
                reason=reason,
            )
            return _Plan(st.get_task(tx, task_id), None, [], st.latest_attempt(tx, task_id))
        try:
            next_status(status, Action.CANCEL, task_id=task_id)  # refuses done, failed, ...
        except Conflict as refusal:
            return _Plan(task, None, [], st.latest_attempt(tx, task_id), refusal)
        attempt = _current_attempt(tx, task)
        if attempt is None or attempt.state == AttemptState.STARTING.value:
            raise Conflict(
                f"task {task_id} is being dispatched right now", hint="try again in a moment"
            )
        if attempt.cancel_requested_at is None:
            st.update_attempt(tx, attempt.id, cancel_requested_at=utcnow())
            # The wrapper records the cancellation itself; this keeps why it was asked for.
            st.record_event(
                tx, "cancel-requested", task_id=task_id, attempt_id=attempt.id, reason=reason
            )
        return _Plan(task, attempt, [])

    plan = app.direct.write(request)
    if plan.last is not None:
        stopped = _stop_leftovers(app, plan.task, plan.last, reason)
        if stopped is not None:
            return stopped
    if plan.refusal is not None:
        raise plan.refusal
    if plan.attempt is None:
        return TaskView(plan.task, notices=plan.notices)
    attempt = plan.attempt
    if attempt.host != app.settings.host:
        # Another host's agent: its wrapper sees the request at its next heartbeat.
        return _still_running(
            app, attempt, f"its agent on {attempt.host} stops at its next heartbeat"
        )
    left = _stop_here(app, attempt)
    if left:
        pids = ", ".join(map(str, sorted(left)))
        return _still_running(app, attempt, f"processes {pids} of its agent are still running")
    return TaskView(_force_cancel(app, attempt.id, reason))


def leftovers(app: App, attempt: AttemptRow | None) -> set[int]:
    """What still runs of an attempt that ended on this host: an agent deaf to the
    hangup whose wrapper was killed outright. Another host's processes are not seen
    from here; a running attempt's are its wrapper's to stop."""
    if attempt is None or attempt.state != AttemptState.ENDED.value:
        return set()
    if attempt.host != app.settings.host:
        return set()
    return agent_processes(app, attempt)


def _stop_leftovers(
    app: App, task: TaskRow, attempt: AttemptRow, reason: str | None
) -> TaskView | None:
    """An ended attempt's leftovers are its agent still at work: cancel stops them. The
    task keeps its status, which already tells how the attempt ended; None when there
    is nothing to stop."""
    found = leftovers(app, attempt)
    if not found:
        return None
    left = stop_processes(lambda: leftovers(app, attempt), grace=STOP_GRACE_SECONDS)
    stopped = sorted(found - left)

    def record(tx: Tx) -> TaskRow:
        st.record_event(
            tx,
            "leftovers-stopped",
            task_id=task.id,
            attempt_id=attempt.id,
            pids=stopped,
            still_running=sorted(left),
            reason=reason,
        )
        return st.get_task(tx, task.id)

    now = app.direct.write(record)
    said = (
        f"stopped processes {' '.join(map(str, stopped))} of attempt {attempt.id}, which "
        f"ran on after it ended; task {task.id} is {now.status}"
    )
    if left:
        raise Conflict(
            f"{said}; processes {' '.join(map(str, sorted(left)))} still run",
            hint="a process stuck in the kernel or a frozen cgroup outlives SIGKILL: see ps",
        )
    return TaskView(now, notices=[said])


def _still_running(app: App, attempt: AttemptRow, why: str) -> TaskView:
    """The cancel is recorded as asked for, not as done: nothing here saw the agent stop."""
    task = app.direct.read(lambda tx: st.get_task(tx, attempt.task_id))
    if task.status != Status.IN_PROGRESS.value or task.current_attempt_id != attempt.id:
        return TaskView(task)  # its wrapper recorded the end meanwhile
    return TaskView(task, notices=[f"cancel requested; attempt {attempt.id} {why}"])


def agent_processes(app: App, attempt: AttemptRow) -> set[int]:
    """The live processes of an attempt of this host: every process carrying the
    attempt's variables, whatever group it is in (the wrapper itself is not one)."""
    marker = attempt_marker(attempt.id, app.settings.database)
    wrapper = attempt.wrapper_pid
    exclude = [wrapper] if wrapper else []
    # The wrapper adopts what its agent orphans; a recorded pid is taken for it only
    # while it still runs this attempt's wrapper (pids are reused).
    argv = command_line(wrapper) if wrapper else None
    adopter = wrapper if argv and " ".join(argv[-2:]) == wrapper_marker(attempt.id) else None
    return attempt_processes(marker, group=attempt.agent_pid, exclude=exclude, adopter=adopter)


def find_pane(app: App, attempt: AttemptRow) -> Pane | None:
    """The attempt's pane on the tmux server it was started on, found as the sweep finds
    it (by its wrapper's command), never assumed; None if there is none or no server."""
    terminal = app.terminal_for(attempt.tmux_socket)
    try:
        return Panes.of(terminal.list_panes()).of_attempt(attempt)
    except ToolFailed:
        return None  # a server that does not answer: the processes are still ours to stop


def _stop_here(app: App, attempt: AttemptRow) -> set[int]:
    """Stop an attempt's agent on this host; returns the processes still running after it.

    Ctrl-C first, as a person would; then the window's hangup, which the wrapper answers
    by stopping the agent's process group; then the processes themselves, which also
    covers a window that cannot be found and a wrapper that cannot act."""
    pane = find_pane(app, attempt)
    if pane is not None:
        terminal = app.terminal_for(attempt.tmux_socket)
        terminal.send_interrupt(pane.window_id)
        if not _wait_ended(app, attempt.id, CANCEL_GRACE_SECONDS):
            terminal.kill_window(pane.window_id)  # SIGHUP: the wrapper stops its agent
            _wait_ended(app, attempt.id, KILL_GRACE_SECONDS)
    current = app.direct.read(lambda tx: st.get_attempt(tx, attempt.id))
    return stop_processes(lambda: agent_processes(app, current), grace=STOP_GRACE_SECONDS)


def _wait_ended(app: App, attempt_id: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = app.direct.read(lambda tx: st.get_attempt(tx, attempt_id).state)
        if state == AttemptState.ENDED.value:
            return True
        time.sleep(0.1)
    return False


def _force_cancel(app: App, attempt_id: int, reason: str | None) -> TaskRow:
    """If the wrapper did not record the cancel itself (it died), record it here."""

    def work(tx: Tx) -> TaskRow:
        attempt = st.get_attempt(tx, attempt_id)
        st.move_attempt(
            tx,
            attempt_id,
            expected=[AttemptState.RUNNING],
            target=AttemptState.ENDED,
            outcome=Outcome.CANCELLED.value,
            ended_at=utcnow(),
        )
        task = st.get_task(tx, attempt.task_id)
        if task.status == Status.IN_PROGRESS.value and task.current_attempt_id == attempt_id:
            st.release_task(
                tx,
                task.id,
                attempt_id=attempt_id,
                target=Status.CANCELLED,
                kind="cancelled",
                detail={"reason": reason},
            )
        return st.get_task(tx, task.id)

    return app.direct.write(work)


def close_task(app: App, task_id: int) -> TaskView:
    """Archive a task; a running attempt is cancelled with detail `closed with task`."""
    task = app.direct.read(lambda tx: st.get_task(tx, task_id))
    if task.closed_at is not None:
        return TaskView(task, notices=[f"task {task_id} is already closed"])
    cancelled: int | None = None
    if task.status == Status.IN_PROGRESS.value:
        cancelled = task.current_attempt_id
        cancel_task(app, task_id, reason="closed with task")

    def work(tx: Tx) -> TaskView:
        current = st.get_task(tx, task_id)
        notices: list[str] = []
        if current.status == Status.IN_PROGRESS.value:
            attempt = _current_attempt(tx, current)
            remote = attempt is not None and attempt.host != app.settings.host
            if not (remote and attempt is not None and attempt.cancel_requested_at):
                raise Conflict(
                    f"task {task_id} is still in-progress; its agent did not stop",
                    hint=f"`dispatch cancel {task_id}`, then close it",
                )
            # Closed is not a status: archive now; that host's wrapper stops the agent
            # at its next heartbeat and records the cancel.
            notices.append(
                f"task {task_id} closed; its agent on {attempt.host} stops at its next heartbeat"
            )
        if not st.close_task(tx, task_id):  # conditional: a concurrent close wrote the event
            return TaskView(current, notices=[f"task {task_id} is already closed"])
        st.record_event(
            tx,
            "closed",
            task_id=task_id,
            from_status=current.status,
            to_status=current.status,
            cancelled_attempt=cancelled,
        )
        return TaskView(st.get_task(tx, task_id), notices=notices)

    return app.direct.write(work)


def signal_done(app: App, task_id: int | None, cwd: Path | None = None) -> tuple[AttemptRow, bool]:
    """Record completion evidence; resolves TASK, then DISPATCH_ATTEMPT_ID, then the cwd.

    Returns the attempt and whether this call recorded it (a second signal changes
    nothing and makes no event)."""
    env_attempt = os.environ.get("DISPATCH_ATTEMPT_ID")
    here = (cwd or Path.cwd()).resolve()

    def work(tx: Tx) -> tuple[AttemptRow, bool]:
        attempt: AttemptRow | None
        if task_id is not None:
            task = st.get_task(tx, task_id)
            attempt = _current_attempt(tx, task)
            if attempt is None:
                raise Conflict(
                    f"task {task_id} is {task.status}; it has no running attempt to mark done"
                )
        elif env_attempt:
            if not env_attempt.isdigit():
                raise UsageError(f"DISPATCH_ATTEMPT_ID is not an attempt id: {env_attempt!r}")
            attempt = st.get_attempt(tx, int(env_attempt))
        else:
            attempt = _attempt_for_directory(tx, here)
        if attempt.state != AttemptState.RUNNING.value:
            raise Conflict(
                f"attempt {attempt.id} of task {attempt.task_id} is {attempt.state}, "
                "not running; there is nothing to mark done"
            )
        if attempt.done_signalled_at is not None:
            return attempt, False
        st.update_attempt(tx, attempt.id, done_signalled_at=utcnow())
        st.record_event(tx, "done-signalled", task_id=attempt.task_id, attempt_id=attempt.id)
        return st.get_attempt(tx, attempt.id), True

    return app.direct.write(work)


def _attempt_for_directory(tx: Tx, here: Path) -> AttemptRow:
    running = [
        a
        for a in st.live_attempts(tx)
        if a.worktree and (here == Path(a.worktree) or Path(a.worktree) in here.parents)
    ]
    tasks = {a.task_id for a in running}
    if not tasks:
        raise NotFound(f"no running attempt has its worktree at {here}", hint="give TASK")
    if len(tasks) > 1:
        raise UsageError(
            f"{here} belongs to several running tasks ({', '.join(map(str, sorted(tasks)))})",
            hint="give TASK",
        )
    return running[-1]


def log_path(app: App, task_id: int, number: int | None) -> tuple[AttemptRow, Path]:
    """The attempt's pane log: the newest attempt, or attempt number N of the task."""

    def work(tx: Tx) -> AttemptRow:
        st.get_task(tx, task_id)
        attempts = st.attempts_of(tx, task_id)
        if number is not None:
            attempts = [a for a in attempts if a.number == number]
            if not attempts:
                raise NotFound(f"task {task_id} has no attempt number {number}")
        if not attempts:
            raise NotFound(f"task {task_id} has not been dispatched yet")
        return attempts[-1]

    attempt = app.direct.read(work)
    return attempt, app.settings.logs_dir / f"attempt-{attempt.id}.log"


def follow_log(app: App, attempt: AttemptRow, path: Path) -> Iterator[bytes]:
    """Chunks of the log as they are written, until the attempt has ended."""
    position = 0
    drain_until: float | None = None
    while True:
        if drain_until is None:
            state = app.direct.read(lambda tx: st.get_attempt(tx, attempt.id).state)
            if state == AttemptState.ENDED.value:
                # The wrapper still prints its last line after recording the end, and
                # tmux's pipe delivers it a moment later: read on until its window is gone.
                drain_until = time.monotonic() + FOLLOW_DRAIN_SECONDS
        ended = drain_until is not None and (
            time.monotonic() >= drain_until or not _window_open(app, attempt)
        )
        if path.exists():
            with path.open("rb") as handle:
                handle.seek(position)
                chunk = handle.read()
            if chunk:
                position += len(chunk)
                yield chunk
                continue
        if ended:
            return
        time.sleep(0.2)


def _window_open(app: App, attempt: AttemptRow) -> bool:
    return attempt.host == app.settings.host and find_pane(app, attempt) is not None


def attach_argv(app: App, task_id: int) -> list[str]:
    """The tmux command that shows the task's window."""

    def work(tx: Tx) -> AttemptRow:
        task = st.get_task(tx, task_id)
        attempt = _current_attempt(tx, task)
        if attempt is None or attempt.state == AttemptState.ENDED.value:
            raise Conflict(f"task {task_id} is {task.status}; it has no window to attach to")
        return attempt

    attempt = app.direct.read(work)
    if attempt.host != app.settings.host:
        raise Conflict(f"task {task_id} runs on {attempt.host}, not here")
    pane = find_pane(app, attempt)
    if pane is None:
        raise Conflict(f"the window of task {task_id} is gone", hint="run `dispatch sweep`")
    terminal = app.terminal_for(attempt.tmux_socket)
    return terminal.attach_argv(pane.window_id, inside_tmux=_inside_server(attempt.tmux_socket))


def _inside_server(socket: str | None) -> bool:
    """`switch-client` only works from a client of the same server; else attach."""
    current = os.environ.get("TMUX", "")
    if not current:
        return False
    socket_path = current.split(",", 1)[0]
    return Path(socket_path).name == (socket or "default")
