"""The status graph, its one gate `next_status`, and outcome derivation (SPEC §2)."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from dispatch.errors import Conflict, Gone
from dispatch.lifecycle import (
    OUTCOME_STATUS,
    RETRYABLE,
    Action,
    AttemptState,
    Completion,
    Outcome,
    Status,
    derive_outcome,
    is_edge,
    next_attempt_state,
    next_status,
)

S = Status

# The graph of SPEC §2 written out by hand, independently of lifecycle.py's tables.
SPEC_EDGES = {
    (S.READY, S.IN_PROGRESS),  # claim
    (S.READY, S.CANCELLED),  # cancel before dispatch
    (S.IN_PROGRESS, S.DONE),
    (S.IN_PROGRESS, S.FAILED),
    (S.IN_PROGRESS, S.INCOMPLETE),
    (S.IN_PROGRESS, S.INTERRUPTED),
    (S.IN_PROGRESS, S.CANCELLED),
    (S.IN_PROGRESS, S.READY),  # rollback of a `run`, sweep --requeue
    (S.FAILED, S.IN_PROGRESS),
    (S.INCOMPLETE, S.IN_PROGRESS),
    (S.INTERRUPTED, S.IN_PROGRESS),
    (S.CANCELLED, S.IN_PROGRESS),
    (S.FAILED, S.READY),
    (S.INCOMPLETE, S.READY),
    (S.INTERRUPTED, S.READY),
    (S.CANCELLED, S.READY),
}


def test_retryable_statuses_are_the_unsuccessful_terminal_ones() -> None:
    assert {S.FAILED, S.INCOMPLETE, S.INTERRUPTED, S.CANCELLED} == RETRYABLE


@pytest.mark.parametrize("source,target", sorted(itertools.product(S, S)))
def test_is_edge_is_exactly_the_spec_graph(source: Status, target: Status) -> None:
    assert is_edge(source, target) == ((source, target) in SPEC_EDGES)


# (status, action, keyword arguments) -> the status SPEC §2 says it leads to.
LEGAL = [
    (S.READY, Action.CLAIM, {}, S.IN_PROGRESS),
    (S.READY, Action.CANCEL, {}, S.CANCELLED),
    (S.IN_PROGRESS, Action.CANCEL, {}, S.CANCELLED),
    (S.IN_PROGRESS, Action.REAP, {}, S.INTERRUPTED),
    (S.IN_PROGRESS, Action.REQUEUE, {}, S.READY),
    (S.IN_PROGRESS, Action.FINISH, {"outcome": Outcome.SUCCESS}, S.DONE),
    (S.IN_PROGRESS, Action.FINISH, {"outcome": Outcome.FAILED}, S.FAILED),
    (S.IN_PROGRESS, Action.FINISH, {"outcome": Outcome.INCOMPLETE}, S.INCOMPLETE),
    (S.IN_PROGRESS, Action.FINISH, {"outcome": Outcome.INTERRUPTED}, S.INTERRUPTED),
    (S.IN_PROGRESS, Action.FINISH, {"outcome": Outcome.CANCELLED}, S.CANCELLED),
    (S.IN_PROGRESS, Action.ROLLBACK, {"prior": S.READY, "failures": 1}, S.READY),
    *[(S.IN_PROGRESS, Action.ROLLBACK, {"prior": s, "failures": 1}, s) for s in RETRYABLE],
    *[(s, Action.REDISPATCH, {}, S.IN_PROGRESS) for s in RETRYABLE],
    *[(s, Action.RESET, {}, S.READY) for s in RETRYABLE],
]


@pytest.mark.parametrize("current,action,kwargs,expected", LEGAL)
def test_every_legal_move(
    current: Status, action: Action, kwargs: dict[str, Any], expected: Status
) -> None:
    assert next_status(current, action, task_id=7, **kwargs) is expected
    assert is_edge(current, expected)


def test_the_legal_moves_cover_every_edge_of_the_graph() -> None:
    assert {(current, target) for current, _, _, target in LEGAL} == SPEC_EDGES


ILLEGAL = [
    (S.DONE, Action.CLAIM),
    (S.DONE, Action.REDISPATCH),
    (S.DONE, Action.RESET),
    (S.DONE, Action.CANCEL),
    (S.DONE, Action.REAP),
    (S.READY, Action.REDISPATCH),
    (S.READY, Action.RESET),
    (S.READY, Action.FINISH),
    (S.READY, Action.ROLLBACK),
    (S.READY, Action.REAP),
    (S.IN_PROGRESS, Action.CLAIM),
    (S.IN_PROGRESS, Action.REDISPATCH),
    (S.IN_PROGRESS, Action.RESET),
    (S.FAILED, Action.CLAIM),
    (S.FAILED, Action.FINISH),
    (S.FAILED, Action.CANCEL),
    (S.CANCELLED, Action.CANCEL),
    (S.CANCELLED, Action.CLAIM),
    (S.INTERRUPTED, Action.REQUEUE),
    (S.INCOMPLETE, Action.REAP),
]


@pytest.mark.parametrize("current,action", ILLEGAL)
def test_illegal_moves_are_refused_as_conflicts_naming_the_status(
    current: Status, action: Action
) -> None:
    with pytest.raises(Conflict) as refused:
        next_status(current, action, task_id=12, outcome=Outcome.SUCCESS, prior=S.READY, failures=1)
    assert refused.value.exit_code == 3
    assert f"task 12 is {current.value}" in refused.value.message


REFUSED_WHEN_CLOSED = [
    (S.READY, Action.CLAIM),
    *[(s, a) for s in RETRYABLE for a in (Action.REDISPATCH, Action.RESET)],
]


@pytest.mark.parametrize("current,action", REFUSED_WHEN_CLOSED)
def test_a_closed_task_refuses_claim_redispatch_and_reset_as_gone(
    current: Status, action: Action
) -> None:
    with pytest.raises(Gone) as refused:
        next_status(current, action, closed=True, task_id=4)
    assert refused.value.exit_code == 5
    assert "task 4 is closed" in refused.value.message
    assert "dispatch reopen 4" in (refused.value.hint or "")


def test_closed_is_refused_before_the_status_is_even_considered() -> None:
    # A closed `done` task asked to reset: the user must reopen first, whatever its status.
    with pytest.raises(Gone):
        next_status(S.DONE, Action.RESET, closed=True, task_id=1)


@pytest.mark.parametrize("action", [Action.CANCEL, Action.REAP, Action.FINISH, Action.ROLLBACK])
def test_closing_does_not_block_stopping_or_recording(action: Action) -> None:
    current = S.READY if action is Action.CANCEL else S.IN_PROGRESS
    target = next_status(
        current, action, closed=True, outcome=Outcome.FAILED, prior=S.READY, failures=1
    )
    assert is_edge(current, target)


@pytest.mark.parametrize("prior", [S.READY, *RETRYABLE])
def test_rollback_returns_to_the_prior_status_below_the_limit(prior: Status) -> None:
    for failures in (1, 2):
        assert next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=failures) is prior


@pytest.mark.parametrize("prior", [S.READY, S.INTERRUPTED])
def test_rollback_parks_the_task_in_failed_at_the_limit(prior: Status) -> None:
    assert next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=3) is S.FAILED
    assert next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=4) is S.FAILED
    assert (
        next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=2, max_failures=2)
        is S.FAILED
    )
    assert (
        next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=1, max_failures=1)
        is S.FAILED
    )


def test_a_limit_of_zero_never_parks_the_task() -> None:
    assert (
        next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=S.READY, failures=99, max_failures=0)
        is S.READY
    )


@pytest.mark.parametrize("prior", [None, S.IN_PROGRESS, S.DONE])
def test_rollback_without_a_valid_pre_claim_status_is_a_programming_error(
    prior: Status | None,
) -> None:
    with pytest.raises(ValueError, match="pre-claim"):
        next_status(S.IN_PROGRESS, Action.ROLLBACK, prior=prior, failures=1)


@pytest.mark.parametrize("outcome", [None, Outcome.DISPATCH_FAILED])
def test_finish_needs_an_agent_outcome(outcome: Outcome | None) -> None:
    with pytest.raises(ValueError, match="outcome"):
        next_status(S.IN_PROGRESS, Action.FINISH, outcome=outcome)


def test_every_agent_outcome_leads_to_the_status_of_the_same_name() -> None:
    assert OUTCOME_STATUS == {
        Outcome.SUCCESS: S.DONE,
        Outcome.INCOMPLETE: S.INCOMPLETE,
        Outcome.FAILED: S.FAILED,
        Outcome.CANCELLED: S.CANCELLED,
        Outcome.INTERRUPTED: S.INTERRUPTED,
    }


E, SIG, COM = Completion.EXIT, Completion.SIGNAL, Completion.COMMITS

# exit code, mode, signalled, commits ahead, cancelled, interrupted -> outcome
OUTCOMES = [
    (0, E, False, 0, False, False, Outcome.SUCCESS),
    (0, E, True, 3, False, False, Outcome.SUCCESS),
    (1, E, False, 0, False, False, Outcome.FAILED),
    (2, E, True, 5, False, False, Outcome.FAILED),
    (-15, E, False, 0, False, False, Outcome.FAILED),
    (None, E, False, 0, False, False, Outcome.FAILED),
    (0, SIG, True, 0, False, False, Outcome.SUCCESS),
    (0, SIG, False, 0, False, False, Outcome.INCOMPLETE),
    (0, SIG, False, 4, False, False, Outcome.INCOMPLETE),  # commits are not the signal
    (1, SIG, True, 0, False, False, Outcome.FAILED),  # a crash after `dispatch done` failed
    (0, COM, False, 1, False, False, Outcome.SUCCESS),
    (0, COM, False, 0, False, False, Outcome.INCOMPLETE),
    (0, COM, True, 0, False, False, Outcome.INCOMPLETE),  # the signal is not commits
    (3, COM, False, 2, False, False, Outcome.FAILED),
    (0, E, False, 0, True, False, Outcome.CANCELLED),
    (1, SIG, False, 0, True, False, Outcome.CANCELLED),
    (0, COM, False, 1, True, True, Outcome.CANCELLED),  # cancelled wins over everything
    (0, E, False, 0, False, True, Outcome.INTERRUPTED),
    (None, SIG, True, 0, False, True, Outcome.INTERRUPTED),
    (1, COM, False, 0, False, True, Outcome.INTERRUPTED),
]


@pytest.mark.parametrize("exit_code,mode,signalled,ahead,cancelled,interrupted,expected", OUTCOMES)
def test_outcome_derivation(
    exit_code: int | None,
    mode: Completion,
    signalled: bool,
    ahead: int,
    cancelled: bool,
    interrupted: bool,
    expected: Outcome,
) -> None:
    outcome = derive_outcome(
        exit_code,
        mode,
        signalled=signalled,
        commits_ahead=ahead,
        cancelled=cancelled,
        interrupted=interrupted,
    )
    assert outcome is expected


def test_attempt_states_only_move_forward() -> None:
    A = AttemptState
    assert next_attempt_state(A.STARTING, A.RUNNING) is A.RUNNING
    assert next_attempt_state(A.STARTING, A.ENDED) is A.ENDED
    assert next_attempt_state(A.RUNNING, A.ENDED) is A.ENDED
    for current, target in [
        (A.RUNNING, A.STARTING),
        (A.ENDED, A.RUNNING),
        (A.ENDED, A.STARTING),
        (A.ENDED, A.ENDED),
        (A.RUNNING, A.RUNNING),
    ]:
        with pytest.raises(Conflict):
            next_attempt_state(current, target)
