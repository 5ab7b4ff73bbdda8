"""Random sequences of actions over a pure model of tasks, checked against SPEC §2.

The model asks `dispatch.lifecycle` for every move, as the services do, and an
oracle written from the specification says what each call must answer. So a
wrong source table, a missing Gone, a broken failure cap or an edge outside the
graph is found whatever order of actions exposes it. The rules take only moves
the oracle allows, so that runs reach deep states (done, parked in failed,
closed); in every state reached, an invariant asks the gate about every action
(it is pure, so asking changes nothing) and compares with the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from dispatch.errors import Conflict, DispatchError, Gone
from dispatch.lifecycle import (
    RETRYABLE,
    Action,
    AttemptState,
    Outcome,
    Status,
    is_edge,
    next_attempt_state,
    next_status,
)

TASKS = 3
# The status each agent outcome leaves behind, from SPEC §2 (not lifecycle's own table).
SPEC_OUTCOME_STATUS = {
    Outcome.SUCCESS: Status.DONE,
    Outcome.INCOMPLETE: Status.INCOMPLETE,
    Outcome.FAILED: Status.FAILED,
    Outcome.CANCELLED: Status.CANCELLED,
    Outcome.INTERRUPTED: Status.INTERRUPTED,
}
AGENT_OUTCOMES = list(SPEC_OUTCOME_STATUS)
# `confirm` is no status change: the wrapper acknowledged, the dispatch succeeded.
CONFIRM = "confirm"
MOVES: list[tuple[Action | str, Outcome | None]] = [
    *[(a, None) for a in Action if a is not Action.FINISH],
    *[(Action.FINISH, o) for o in AGENT_OUTCOMES],
    (CONFIRM, None),
]


@dataclass
class ModelAttempt:
    id: int
    state: AttemptState
    prior: Status  # the status to roll back to


@dataclass
class ModelTask:
    status: Status = Status.READY
    closed: bool = False
    attempt: ModelAttempt | None = None  # the current attempt
    failures: int = 0  # consecutive failed dispatches


Expected: TypeAlias = "Status | type[DispatchError] | None"


class LifecycleMachine(RuleBasedStateMachine):
    """Tasks driven only through `next_status`, the one gate every service uses."""

    def __init__(self) -> None:
        super().__init__()
        self.tasks = [ModelTask() for _ in range(TASKS)]
        self.limit = 3
        self.next_attempt = 1
        self.ended: set[int] = set()

    @initialize(limit=st.integers(min_value=0, max_value=4))
    def choose_limit(self, limit: int) -> None:
        self.limit = limit

    # -- the oracle: SPEC §2 written out by hand -----------------------------------------

    def expected(self, i: int, action: Action | str, outcome: Outcome | None) -> Expected:
        """What the gate must answer; None where no service ever asks it."""
        task = self.tasks[i]
        status, attempt = task.status, task.attempt
        starting = attempt is not None and attempt.state is AttemptState.STARTING
        running = attempt is not None and attempt.state is AttemptState.RUNNING
        if action == CONFIRM:
            return Status.IN_PROGRESS if starting else None
        if action in (Action.CLAIM, Action.REDISPATCH, Action.RESET) and task.closed:
            return Gone
        if action is Action.CLAIM:
            return Status.IN_PROGRESS if status is Status.READY else Conflict
        if action is Action.REDISPATCH:
            return Status.IN_PROGRESS if status in RETRYABLE else Conflict
        if action is Action.RESET:
            return Status.READY if status in RETRYABLE else Conflict
        if action is Action.CANCEL:
            if starting:
                return None  # refused by the service: the dispatch decides first
            return Status.CANCELLED if status in (Status.READY, Status.IN_PROGRESS) else Conflict
        if status is not Status.IN_PROGRESS:
            return Conflict  # rollback, finish, reap and requeue need a dispatched task
        assert attempt is not None
        if action is Action.ROLLBACK:
            if not starting:
                return None  # only a dispatch still starting rolls back
            capped = self.limit > 0 and task.failures + 1 >= self.limit
            return Status.FAILED if capped else attempt.prior
        if not running:
            return None
        if action is Action.FINISH:
            assert outcome is not None
            return SPEC_OUTCOME_STATUS[outcome]
        return Status.READY if action is Action.REQUEUE else Status.INTERRUPTED

    # -- applying a move -----------------------------------------------------------------

    def ask(self, i: int, action: Action, outcome: Outcome | None) -> Expected:
        """The gate's answer: the target status, or the class of the refusal."""
        task = self.tasks[i]
        try:
            return next_status(
                task.status,
                action,
                closed=task.closed,
                task_id=i,
                outcome=outcome,
                prior=task.attempt.prior if task.attempt else None,
                failures=task.failures + 1 if action is Action.ROLLBACK else task.failures,
                max_failures=self.limit,
            )
        except DispatchError as refused:
            assert refused.exit_code == {Gone: 5, Conflict: 3}[type(refused)]
            return type(refused)

    def apply(self, i: int, action: Action | str, outcome: Outcome | None) -> None:
        want = self.expected(i, action, outcome)
        task = self.tasks[i]
        if action == CONFIRM:
            assert task.attempt is not None
            task.attempt.state = next_attempt_state(task.attempt.state, AttemptState.RUNNING)
            task.failures = 0
            return
        assert isinstance(action, Action) and isinstance(want, Status)
        target = self.ask(i, action, outcome)
        assert target == want, f"{action} from {task} gave {target}, not {want}"
        self.move(i, action, want)

    def move(self, i: int, action: Action, target: Status) -> None:
        task = self.tasks[i]
        assert target != task.status
        assert is_edge(task.status, target), f"illegal edge {task.status} -> {target}"
        if action in (Action.CLAIM, Action.REDISPATCH):
            assert not task.closed, "a closed task was dispatched"
            assert task.attempt is None, "a task got a second current attempt"
            task.attempt = ModelAttempt(self.next_attempt, AttemptState.STARTING, task.status)
            self.next_attempt += 1
        elif task.attempt is not None:
            task.attempt.state = next_attempt_state(task.attempt.state, AttemptState.ENDED)
            self.ended.add(task.attempt.id)
            task.attempt = None
        if action is Action.ROLLBACK:
            task.failures += 1
        if action is Action.RESET:
            task.failures = 0
        task.status = target

    # -- rules ---------------------------------------------------------------------------

    @rule(data=st.data())
    def legal_move(self, data: st.DataObject) -> None:
        """A move the specification allows (refusals are checked by an invariant)."""
        allowed = [
            (i, action, outcome)
            for i in range(TASKS)
            for action, outcome in MOVES
            if isinstance(self.expected(i, action, outcome), Status)
        ]
        if allowed:
            self.apply(*data.draw(st.sampled_from(allowed)))

    @rule(i=st.integers(0, TASKS - 1))
    def close(self, i: int) -> None:
        task = self.tasks[i]
        if task.closed or (task.attempt and task.attempt.state is AttemptState.STARTING):
            return  # closing twice is a no-op; a dispatch under way decides first
        if task.status is Status.IN_PROGRESS:  # closing cascades: the agent is cancelled
            self.apply(i, Action.CANCEL, None)
            assert task.status is Status.CANCELLED  # type: ignore[comparison-overlap]
        task.closed = True

    @rule(i=st.integers(0, TASKS - 1))
    def reopen(self, i: int) -> None:
        self.tasks[i].closed = False

    # -- invariants ----------------------------------------------------------------------

    @invariant()
    def the_gate_agrees_with_the_specification(self) -> None:
        for i in range(TASKS):
            for action, outcome in MOVES:
                want = self.expected(i, action, outcome)
                if want is None or action == CONFIRM:
                    continue
                assert isinstance(action, Action)
                got = self.ask(i, action, outcome)
                assert got == want, f"{action} from {self.tasks[i]}: gate {got}, spec {want}"
                if isinstance(got, Status):
                    assert is_edge(self.tasks[i].status, got)

    @invariant()
    def a_current_attempt_exactly_while_in_progress(self) -> None:
        for task in self.tasks:
            assert isinstance(task.status, Status)
            assert (task.attempt is not None) == (task.status is Status.IN_PROGRESS)
            if task.attempt is not None:
                assert task.attempt.state is not AttemptState.ENDED
                assert task.attempt.id not in self.ended

    @invariant()
    def closed_tasks_never_run(self) -> None:
        for task in self.tasks:
            assert not (task.closed and task.status is Status.IN_PROGRESS)

    @invariant()
    def the_failure_counter_caps_at_failed(self) -> None:
        if self.limit == 0:
            return
        for task in self.tasks:
            if task.failures >= self.limit:
                # Parked by the cap: only a reset (which clears the count) or a redispatch
                # (whose success clears it, and whose failure parks it again) moves it on.
                retrying = task.attempt is not None
                assert task.status is Status.FAILED or retrying, f"{task} escaped the cap"


LifecycleMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None
)
TestLifecycle = LifecycleMachine.TestCase
