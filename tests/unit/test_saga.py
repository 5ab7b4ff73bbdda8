"""The saga: steps in order, undos in reverse on any failure, failures of undos recorded."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from dispatch.errors import ToolFailed
from dispatch.services.saga import (
    NO_WORK,
    Interrupted,
    Saga,
    Step,
    StepFailed,
    signals_interrupt,
)


@dataclass
class Log:
    """What ran, in order: "do a", "undo a", "fence", "failure <step>"."""

    entries: list[str] = field(default_factory=list)
    failures: list[StepFailed] = field(default_factory=list)

    def fence(self, _ctx: Log) -> None:
        self.entries.append("fence")

    def on_failure(self, failure: StepFailed) -> None:
        self.entries.append(f"failure {failure.step}")
        self.failures.append(failure)


def ok(name: str, result: object = True) -> Callable[[Log], object]:
    def action(log: Log) -> object:
        log.entries.append(f"do {name}")
        return result

    return action


def undo(name: str) -> Callable[[Log], None]:
    def action(log: Log) -> None:
        log.entries.append(f"undo {name}")

    return action


def fail_with(name: str, exc: BaseException) -> Callable[[Log], object]:
    def action(log: Log) -> object:
        log.entries.append(f"do {name}")
        raise exc

    return action


def run(steps: list[Step[Log]], log: Log, **kwargs: object) -> Saga[Log]:
    saga: Saga[Log] = Saga(steps, **kwargs)  # type: ignore[arg-type]
    saga.run(log, fence=log.fence, on_failure=log.on_failure)
    return saga


def test_all_steps_succeed_no_undo_no_fence() -> None:
    log = Log()
    saga = run([Step("a", ok("a"), undo("a")), Step("b", ok("b"), undo("b"))], log)
    assert log.entries == ["do a", "do b"]
    assert saga.completed == ["a", "b"]
    assert log.failures == []


def test_undos_run_in_reverse_including_the_failing_step() -> None:
    """The failing step registered its undo before acting, so a half-done step is undone."""
    log = Log()
    boom = RuntimeError("disk on fire")
    steps = [
        Step("claim", ok("claim"), atomic=True),
        Step("a", ok("a"), undo("a")),
        Step("b", ok("b"), undo("b")),
        Step("c", fail_with("c", boom), undo("c")),
        Step("d", ok("d"), undo("d")),
    ]
    with pytest.raises(StepFailed) as caught:
        run(steps, log)
    assert log.entries == [
        "do claim",
        "do a",
        "do b",
        "do c",
        "fence",
        "undo c",
        "undo b",
        "undo a",
        "failure c",
    ]
    assert caught.value.step == "c"
    assert caught.value.cause is boom
    assert caught.value.reason == "disk on fire"
    assert caught.value.__cause__ is boom
    assert caught.value.undo_errors == []


@pytest.mark.parametrize("falsy", [False, None, 0, "", []])
def test_a_falsy_return_is_a_failure(falsy: object) -> None:
    log = Log()
    steps = [Step("a", ok("a"), undo("a")), Step("b", ok("b", falsy), undo("b"))]
    with pytest.raises(StepFailed) as caught:
        run(steps, log)
    assert caught.value.step == "b"
    assert caught.value.cause == NO_WORK
    assert log.entries == ["do a", "do b", "fence", "undo b", "undo a", "failure b"]


def test_a_failed_atomic_step_has_nothing_to_undo() -> None:
    """An atomic step (a transaction) that failed made nothing: its undo must not run."""
    log = Log()
    steps = [
        Step("a", ok("a"), undo("a")),
        Step("tx", fail_with("tx", RuntimeError("locked")), undo("tx"), atomic=True),
    ]
    with pytest.raises(StepFailed):
        run(steps, log)
    assert log.entries == ["do a", "do tx", "fence", "undo a", "failure tx"]


def test_a_completed_atomic_step_is_undone() -> None:
    log = Log()
    steps = [
        Step("tx", ok("tx"), undo("tx"), atomic=True),
        Step("b", fail_with("b", ToolFailed(["git", "worktree"], 128, "fatal: x")), undo("b")),
    ]
    with pytest.raises(StepFailed) as caught:
        run(steps, log)
    assert log.entries == ["do tx", "do b", "fence", "undo b", "undo tx", "failure b"]
    assert caught.value.reason == "git worktree: fatal: x"


def test_a_failing_undo_is_recorded_and_the_others_still_run() -> None:
    """The original error stays the headline; the undo's failure is reported with it."""
    log = Log()
    seen: list[tuple[str, str]] = []

    def broken_undo(ctx: Log) -> None:
        ctx.entries.append("undo b (breaks)")
        raise ToolFailed(["git", "worktree", "remove"], 1, "fatal: busy")

    steps = [
        Step("a", ok("a"), undo("a")),
        Step("b", ok("b"), broken_undo),
        Step("c", fail_with("c", ValueError("original")), undo("c")),
    ]
    with pytest.raises(StepFailed) as caught:
        run(steps, log, on_undo_error=lambda name, exc: seen.append((name, str(exc))))
    assert log.entries == [
        "do a",
        "do b",
        "do c",
        "fence",
        "undo c",
        "undo b (breaks)",
        "undo a",
        "failure c",
    ]
    failure = caught.value
    assert failure.step == "c"
    assert failure.reason == "original"
    assert failure.undo_errors == ["undo b: git worktree: fatal: busy"]
    assert seen == [("b", "git worktree: fatal: busy")]
    assert log.failures == [failure]


def test_a_failing_fence_is_recorded_and_the_undos_still_run() -> None:
    log = Log()

    def fence(ctx: Log) -> None:
        ctx.entries.append("fence (breaks)")
        raise RuntimeError("database is locked")

    saga: Saga[Log] = Saga([Step("a", ok("a"), undo("a")), Step("b", ok("b", False))])
    with pytest.raises(StepFailed) as caught:
        saga.run(log, fence=fence, on_failure=log.on_failure)
    assert log.entries == ["do a", "do b", "fence (breaks)", "undo a", "failure b"]
    assert caught.value.undo_errors == ["fence: database is locked"]
    assert caught.value.cause == NO_WORK


def test_a_failing_on_failure_does_not_hide_the_original_error() -> None:
    log = Log()

    def on_failure(failure: StepFailed) -> None:
        log.entries.append("failure (breaks)")
        raise RuntimeError("database is gone")

    saga: Saga[Log] = Saga([Step("a", ok("a"), undo("a")), Step("b", ok("b", None))])
    with pytest.raises(StepFailed) as caught:
        saga.run(log, fence=log.fence, on_failure=on_failure)
    assert caught.value.step == "b"
    assert caught.value.cause == NO_WORK
    assert caught.value.undo_errors == ["recording the failure: database is gone"]
    assert log.entries == ["do a", "do b", "fence", "undo a", "failure (breaks)"]


def test_keyboard_interrupt_is_compensated() -> None:
    log = Log()
    steps = [
        Step("a", ok("a"), undo("a")),
        Step("b", fail_with("b", KeyboardInterrupt()), undo("b")),
        Step("c", ok("c"), undo("c")),
    ]
    with pytest.raises(StepFailed) as caught:
        run(steps, log)
    assert log.entries == ["do a", "do b", "fence", "undo b", "undo a", "failure b"]
    assert caught.value.interrupted
    assert caught.value.reason == "interrupted by SIGINT"


def test_sigterm_during_a_step_is_compensated() -> None:
    """signals_interrupt turns SIGTERM into an exception the saga compensates."""
    log = Log()

    def wait_for_sigterm(ctx: Log) -> object:
        ctx.entries.append("do b")
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):  # the handler runs between bytecodes
            pass
        return True  # never reached when the signal is turned into an exception

    steps = [Step("a", ok("a"), undo("a")), Step("b", wait_for_sigterm, undo("b"))]
    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(StepFailed) as caught, signals_interrupt():
        run(steps, log)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert isinstance(caught.value.cause, Interrupted)
    assert caught.value.interrupted
    assert caught.value.reason == "interrupted by SIGTERM"
    assert log.entries == ["do a", "do b", "fence", "undo b", "undo a", "failure b"]


def test_signals_are_ignored_while_undoing() -> None:
    """A second Ctrl-C or a SIGTERM during the undos must not leave them half done."""
    log = Log()

    def impatient_undo(ctx: Log) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        ctx.entries.append("undo a (signalled)")

    steps = [Step("a", ok("a"), impatient_undo), Step("b", ok("b", False), undo("b"))]
    with signals_interrupt(), pytest.raises(StepFailed) as caught:
        run(steps, log)
    assert log.entries == ["do a", "do b", "fence", "undo b", "undo a (signalled)", "failure b"]
    assert caught.value.cause == NO_WORK
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_fence_and_on_failure_run_once_and_fence_first() -> None:
    log = Log()
    steps = [Step(n, ok(n), undo(n)) for n in "abc"] + [Step("d", ok("d", 0), undo("d"))]
    with pytest.raises(StepFailed):
        run(steps, log)
    assert log.entries.count("fence") == 1
    assert log.entries.count("failure d") == 1
    assert log.entries.index("fence") < log.entries.index("undo d")
    assert log.entries[-1] == "failure d"


def test_the_first_step_failing_runs_no_undo_but_still_fences_and_records() -> None:
    log = Log()
    with pytest.raises(StepFailed) as caught:
        run([Step("claim", ok("claim", False), atomic=True), Step("a", ok("a"), undo("a"))], log)
    assert log.entries == ["do claim", "fence", "failure claim"]
    assert caught.value.step == "claim"


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    log = Log()
    with pytest.raises(StepFailed) as caught:
        run([Step("a", fail_with("a", ConnectionError()), undo("a"))], log)
    assert caught.value.reason == "ConnectionError"
    assert str(caught.value) == "a: ConnectionError"


def test_a_fault_named_after_no_method_of_the_adapter_is_refused() -> None:
    from tests.faults import Faulty, raises

    class Adapter:
        def add(self) -> str:
            return "added"

    with pytest.raises(TypeError, match="Adapter has no method ad, remove"):
        Faulty(Adapter(), ad=raises(RuntimeError("x")), remove=raises(RuntimeError("y")))
    faulty = Faulty(Adapter(), add=raises(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        faulty.add()
