"""The task status graph and outcome derivation (SPEC §2): pure rules, no I/O.

Every status change in dispatch asks `next_status` first, so an illegal edge is
refused in one place whatever service attempts it.
"""

from __future__ import annotations

from enum import StrEnum

from dispatch.errors import Conflict, Gone


class Status(StrEnum):
    READY = "ready"
    IN_PROGRESS = "in-progress"
    DONE = "done"
    FAILED = "failed"
    INCOMPLETE = "incomplete"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"


class Action(StrEnum):
    CLAIM = "claim"  # `run`: ready -> in-progress
    REDISPATCH = "redispatch"  # retryable terminal -> in-progress
    ROLLBACK = "rollback"  # failed dispatch: back to the pre-claim status
    FINISH = "finish"  # the wrapper records the agent's outcome
    REAP = "reap"  # sweep: agent gone
    REQUEUE = "requeue"  # sweep --requeue: agent gone, back to ready
    CANCEL = "cancel"
    RESET = "reset"


class AttemptState(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    ENDED = "ended"


class Outcome(StrEnum):
    SUCCESS = "success"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    DISPATCH_FAILED = "dispatch-failed"


class Completion(StrEnum):
    EXIT = "exit"
    SIGNAL = "signal"
    COMMITS = "commits"


# Statuses a redispatch or reset may start from: finished, but not successfully.
RETRYABLE: frozenset[Status] = frozenset(
    {Status.FAILED, Status.INCOMPLETE, Status.INTERRUPTED, Status.CANCELLED}
)

# The task status each attempt outcome leaves behind.
OUTCOME_STATUS: dict[Outcome, Status] = {
    Outcome.SUCCESS: Status.DONE,
    Outcome.INCOMPLETE: Status.INCOMPLETE,
    Outcome.FAILED: Status.FAILED,
    Outcome.CANCELLED: Status.CANCELLED,
    Outcome.INTERRUPTED: Status.INTERRUPTED,
}

_SOURCES: dict[Action, frozenset[Status]] = {
    Action.CLAIM: frozenset({Status.READY}),
    Action.REDISPATCH: RETRYABLE,
    Action.ROLLBACK: frozenset({Status.IN_PROGRESS}),
    Action.FINISH: frozenset({Status.IN_PROGRESS}),
    Action.REAP: frozenset({Status.IN_PROGRESS}),
    Action.REQUEUE: frozenset({Status.IN_PROGRESS}),
    Action.CANCEL: frozenset({Status.READY, Status.IN_PROGRESS}),
    Action.RESET: RETRYABLE,
}

# Actions a closed task refuses (SPEC §2: run, redispatch, reset need `reopen`).
_REFUSED_WHEN_CLOSED = frozenset({Action.CLAIM, Action.REDISPATCH, Action.RESET})

_ALLOWED_EDGES: frozenset[tuple[Status, Status]] = frozenset(
    {(Status.READY, Status.IN_PROGRESS), (Status.READY, Status.CANCELLED)}
    | {(s, Status.IN_PROGRESS) for s in RETRYABLE}
    | {(s, Status.READY) for s in RETRYABLE}
    | {(Status.IN_PROGRESS, s) for s in Status if s is not Status.IN_PROGRESS}
)


def is_edge(source: Status, target: Status) -> bool:
    """Whether the status graph has an edge source -> target."""
    return (source, target) in _ALLOWED_EDGES


def next_status(
    current: Status,
    action: Action,
    *,
    closed: bool = False,
    task_id: int | None = None,
    outcome: Outcome | None = None,
    prior: Status | None = None,
    failures: int = 0,
    max_failures: int = 3,
) -> Status:
    """The status `action` moves a task to from `current`; raises Conflict or Gone if illegal.

    `outcome` is needed for FINISH; `prior` (the pre-claim status) and
    `failures` (consecutive failed dispatches, this one included) for ROLLBACK.
    """
    name = f"task {task_id}" if task_id is not None else "the task"
    if closed and action in _REFUSED_WHEN_CLOSED:
        raise Gone(f"{name} is closed", hint=f"run `dispatch reopen {task_id or 'TASK'}` first")
    if current not in _SOURCES[action]:
        raise Conflict(f"{name} is {current}; cannot {action} it")
    target = _target(action, outcome=outcome, prior=prior, failures=failures, limit=max_failures)
    if not is_edge(current, target):  # a defence against a wrong table above
        raise Conflict(f"{name}: no edge {current} -> {target}")
    return target


def _target(
    action: Action, *, outcome: Outcome | None, prior: Status | None, failures: int, limit: int
) -> Status:
    if action in (Action.CLAIM, Action.REDISPATCH):
        return Status.IN_PROGRESS
    if action in (Action.RESET, Action.REQUEUE):
        return Status.READY
    if action is Action.CANCEL:
        return Status.CANCELLED
    if action is Action.REAP:
        return Status.INTERRUPTED
    if action is Action.ROLLBACK:
        if prior is None or not (prior is Status.READY or prior in RETRYABLE):
            raise ValueError(f"rollback needs the pre-claim status, got {prior!r}")
        # A cron loop must not spin on a broken task: cap consecutive failures.
        return Status.FAILED if limit > 0 and failures >= limit else prior
    if outcome is None or outcome not in OUTCOME_STATUS:
        raise ValueError(f"finish needs an agent outcome, got {outcome!r}")
    return OUTCOME_STATUS[outcome]


def derive_outcome(
    exit_code: int | None,
    completion: Completion,
    *,
    signalled: bool = False,
    commits_ahead: int = 0,
    cancelled: bool = False,
    interrupted: bool = False,
) -> Outcome:
    """The attempt outcome from what the wrapper saw when the agent ended (SPEC §2)."""
    if cancelled:
        return Outcome.CANCELLED
    if interrupted:
        return Outcome.INTERRUPTED
    if exit_code != 0:
        return Outcome.FAILED
    if completion is Completion.EXIT:
        return Outcome.SUCCESS
    if completion is Completion.SIGNAL:
        return Outcome.SUCCESS if signalled else Outcome.INCOMPLETE
    return Outcome.SUCCESS if commits_ahead > 0 else Outcome.INCOMPLETE


def next_attempt_state(current: AttemptState, target: AttemptState) -> AttemptState:
    """Attempt states only move forward: starting -> running -> ended, or starting -> ended."""
    order = [AttemptState.STARTING, AttemptState.RUNNING, AttemptState.ENDED]
    if order.index(target) <= order.index(current):
        raise Conflict(f"attempt is {current}; cannot move it to {target}")
    return target
