"""How an attempt's agent ended, or why it never started: the wrapper's last writes.

They go through the models, and retry until they land: an unrecorded exit would leave
a lie behind. Loaded only when the agent has ended or could not start, so that the
wrapper starts the agent without SQLAlchemy's import.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from sqlalchemy.orm import Session

from dispatch.app import App
from dispatch.errors import DispatchError
from dispatch.lifecycle import Action, AttemptState, Completion, Outcome, Status, derive_outcome
from dispatch.lifecycle import next_status as lifecycle_next
from dispatch.services.wrapper import say
from dispatch.store import queries as q
from dispatch.store.direct import utcnow
from dispatch.store.models import Attempt, Task

T = TypeVar("T")
# How long the wrapper keeps trying to record an exit when the database is busy.
RECORD_PATIENCE_SECONDS = 120.0


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


def _load(s: Session, attempt_id: int) -> tuple[Attempt, Task]:
    attempt = q.get_attempt(s, attempt_id)
    return attempt, q.get_task(s, attempt.task_id)


def give_up(app: App, attempt_id: int, message: str, *, acknowledged: bool = False) -> None:
    """The agent cannot start: end the attempt so the dispatcher rolls back at once.

    The task itself is left to the dispatcher (or, if it died, to the sweep): a failed
    start is a failed dispatch, not a failed agent.
    """
    expected = [AttemptState.RUNNING] if acknowledged else [AttemptState.STARTING]
    patiently(
        lambda: app.db.write(
            lambda s: q.move_attempt(
                s,
                attempt_id,
                expected=expected,
                target=AttemptState.ENDED,
                outcome=Outcome.DISPATCH_FAILED.value,
                ended_at=utcnow(),
                error=message,
            )
        )
    )


def finish(app: App, attempt_id: int, code: int, *, interrupted: bool) -> Status | None:
    """Record the exit and outcome; change the task only if this attempt still owns it."""
    attempt, task = patiently(lambda: app.db.read(lambda s: _load(s, attempt_id)))
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
    return patiently(lambda: app.db.write(lambda s: _record(s, attempt_id, code, outcome)))


def _record(s: Session, attempt_id: int, code: int, outcome: Outcome) -> Status | None:
    now = utcnow()
    ended = q.move_attempt(
        s,
        attempt_id,
        expected=[AttemptState.RUNNING],
        target=AttemptState.ENDED,
        outcome=outcome.value,
        exit_code=code,
        ended_at=now,
    )
    attempt = q.get_attempt(s, attempt_id)
    task = q.get_task(s, attempt.task_id)
    if not ended:
        # Reaped or superseded: record our own exit, never the task's status.
        if attempt.exit_code is None:
            q.update_attempt(s, attempt_id, exit_code=code)
        q.record_event(
            s,
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
    if not q.release_task(
        s,
        task.id,
        attempt_id=attempt_id,
        target=target,
        kind="finished",
        values={"last_error": error},
        exit_code=code,
        outcome=outcome.value,
    ):
        return None
    return target
