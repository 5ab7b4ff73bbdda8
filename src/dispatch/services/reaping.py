"""The sweep's writes: each reap is one conditional update plus one event."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import DispatchError
from dispatch.flock import FileLock, LockHeld
from dispatch.lifecycle import Action, AttemptState, Outcome, Status, next_status
from dispatch.services.cleanup import remove_created, remove_prompt, roll_back
from dispatch.services.intent import Intent
from dispatch.store import statements as st
from dispatch.store.direct import Tx
from dispatch.store.statements import AttemptCheck, AttemptRow

if TYPE_CHECKING:
    from dispatch.services.panes import Panes

# How long a sweep waits for another sweep that is finishing an undo on this host.
UNDO_LOCK_SECONDS = 60.0


@dataclass(frozen=True)
class Reap:
    task_id: int
    attempt_id: int | None
    reason: str
    status: str


def reap_running(app: App, attempt: AttemptCheck, reason: str, requeue: bool) -> Reap | None:
    # A cancel was asked for and the agent is gone: that is what the user wanted.
    cancelled = attempt.cancel_requested_at is not None
    if cancelled:
        action, outcome = Action.CANCEL, Outcome.CANCELLED
    else:
        action, outcome = (Action.REQUEUE if requeue else Action.REAP), Outcome.INTERRUPTED

    def work(tx: Tx) -> Reap | None:
        if not st.move_attempt(
            tx,
            attempt.id,
            expected=[AttemptState.RUNNING],
            target=AttemptState.ENDED,
            outcome=outcome.value,
            ended_at=utcnow(),
            error=reason,
        ):
            return None  # another sweep, or the wrapper itself, got there first
        target = next_status(Status.IN_PROGRESS, action, task_id=attempt.task_id)
        if not st.release_task(
            tx,
            attempt.task_id,
            attempt_id=attempt.id,
            target=target,
            kind="reaped",
            columns={"last_error": f"{outcome.value}: {reason}"},
            detail={"reason": reason},
        ):
            return None  # a superseded attempt: its end is recorded, the task is not ours
        return Reap(attempt.task_id, attempt.id, reason, target.value)

    return app.direct.write(work)


# What a reap that undoes a dispatch gives back: the reap (None if someone else got
# there first) and what it could not clean up, for a person to look at.
Undone = tuple["Reap | None", list[str]]


def reap_dispatch(app: App, attempt: AttemptCheck, reason: str, panes: Panes) -> Undone:
    """A dispatcher died mid-saga: fence its attempt, finish its undo, roll back."""
    won = app.direct.write(
        lambda tx: st.end_failed_dispatch(
            tx, attempt.id, expected=[AttemptState.STARTING], error=reason
        )
    )
    if not won:
        return None, []  # another sweep, or its wrapper acknowledging, got there first
    return _finish_undo(app, attempt.id, reason, panes)


def reap_stuck(
    app: App,
    task_id: int,
    attempt: AttemptCheck | None,
    reason: str,
    panes: Panes,
) -> Undone:
    if attempt is not None:
        return _finish_undo(app, attempt.id, attempt.error or reason, panes)

    def work(tx: Tx) -> Reap | None:
        target = next_status(Status.IN_PROGRESS, Action.REAP, task_id=task_id)
        if not st.release_task(
            tx,
            task_id,
            attempt_id=None,
            target=target,
            kind="reaped",
            columns={"last_error": reason},
            detail={"reason": reason},
        ):
            return None
        return Reap(task_id, None, reason, target.value)

    return app.direct.write(work), []


def _still_to_undo(app: App, attempt_id: int) -> AttemptRow | None:
    """The attempt, if its task still waits for this attempt's rollback."""

    def work(tx: Tx) -> AttemptRow | None:
        attempt = st.get_attempt(tx, attempt_id)
        task = st.get_task(tx, attempt.task_id)
        pending = (
            attempt.state == AttemptState.ENDED.value
            and task.status == Status.IN_PROGRESS.value
            and task.current_attempt_id == attempt_id
        )
        return attempt if pending else None

    return app.direct.read(work)


def _finish_undo(app: App, attempt_id: int, reason: str, panes: Panes) -> Undone:
    """Undo, from the write-ahead intent, what a dead dispatch created; then roll back.

    Serialised on this host and re-checked under the lock: a sweep working from an
    older snapshot must never undo a rollback that already happened, because the task
    may have been dispatched again into the same worktree and branch since.
    """
    settings = app.settings
    settings.locks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    problems: list[str] = []
    try:
        with FileLock(str(settings.locks_dir / "sweep-undo.lock"), timeout=UNDO_LOCK_SECONDS):
            attempt = _still_to_undo(app, attempt_id)
            if attempt is None:
                return None, problems
            if attempt.host == settings.host:
                problems.extend(_undo_here(app, attempt, panes))
            elif (made := Intent.of(attempt.intent)).worktree:
                problems.append(
                    f"attempt {attempt_id}: worktree {made.worktree} and branch "
                    f"{made.branch} were made on {attempt.host}; "
                    "a sweep there cannot undo them any more, check them by hand"
                )
            # Kept in the event too: a read that reconciles reports nothing, and what
            # could not be undone must not be known only to whoever happened to reap.
            undo = {"undo_errors": problems} if problems else {}
            status = roll_back(app, attempt_id, reason, {"step": "sweep", **undo})
    except LockHeld:
        problems.append(f"attempt {attempt_id}: another sweep is still undoing it")
        return None, problems
    if status is None:
        return None, problems
    return Reap(attempt.task_id, attempt_id, reason, status.value), problems


def _undo_here(app: App, attempt: AttemptRow, panes: Panes) -> list[str]:
    """Kill the attempt's window, remove its prompt file, worktree and branch it created."""
    problems: list[str] = []
    intent = Intent.of(attempt.intent)
    try:
        # Only windows that run this very attempt's wrapper: a window id from the intent
        # may have been reused by a newer tmux server for another task's agent.
        session = intent.session or attempt.tmux_session
        for pane in panes.by_attempt.get(attempt.id, []):
            if pane.session == session:
                app.terminal.kill_window(pane.window_id)
    except DispatchError as exc:
        problems.append(f"attempt {attempt.id}: undo window: {exc.message}")
    try:
        if intent.worktree:
            problems.extend(
                remove_created(app, intent, agent_started=attempt.agent_pid is not None)
            )
    except DispatchError as exc:
        problems.append(f"attempt {attempt.id}: undo worktree: {exc.message}")
    remove_prompt(app, attempt.id)
    return problems
