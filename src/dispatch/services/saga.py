"""The compensating transaction: steps run in order; on any failure the undos run in reverse.

A step fails by raising, by a non-zero exit (adapters raise ToolFailed), or by
reporting success without doing its work (a falsy return). Each step's undo is
registered *before* its action runs, so a step that fails half way is undone too:
undos must therefore be safe when their action did nothing.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Generic, TypeVar

C = TypeVar("C")

NO_WORK = "reported success but did not do its work"


@dataclass(frozen=True)
class Step(Generic[C]):
    """One step: `action` returns something truthy when it did its work."""

    name: str
    action: Callable[[C], object]
    undo: Callable[[C], None] | None = None
    # A step whose action is atomic (a database transaction) registers its undo only
    # once it has succeeded: a failed atomic action left nothing to undo.
    atomic: bool = False


class StepFailed(Exception):
    """A saga step failed and the undos ran; carries what failed and what the undos hit."""

    def __init__(self, step: str, cause: BaseException | str, undo_errors: list[str]) -> None:
        self.step = step
        self.cause = cause
        self.undo_errors = undo_errors
        super().__init__(f"{step}: {self.reason}")

    @property
    def reason(self) -> str:
        return self.cause if isinstance(self.cause, str) else describe(self.cause)

    @property
    def interrupted(self) -> bool:
        """Whether a signal (Ctrl-C, SIGTERM, SIGHUP) rather than a fault stopped the saga."""
        return isinstance(self.cause, KeyboardInterrupt | Interrupted)


class Interrupted(BaseException):
    """SIGTERM (or SIGHUP) arrived during a saga; raised so the undos run."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


class _NoWork(Exception):
    """A step returned something falsy."""


def describe(exc: BaseException) -> str:
    """One line saying what went wrong."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted by SIGINT"
    text = str(exc)
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__


@dataclass
class Saga(Generic[C]):
    """Runs a list of steps against a context object."""

    steps: Sequence[Step[C]]
    # Called with (step name, undo error) when an undo fails; the original error still wins.
    on_undo_error: Callable[[str, BaseException], None] | None = None
    completed: list[str] = field(default_factory=list)

    def run(
        self,
        ctx: C,
        *,
        fence: Callable[[C], None] | None = None,
        on_failure: Callable[[StepFailed], None] | None = None,
    ) -> None:
        """Run every step; on failure fence, undo, record (`on_failure`), raise StepFailed.

        `fence` runs first so that nothing the steps started (an agent wrapper) can act on
        the outcome while the undos run; `on_failure` runs last, knowing what the undos hit.
        """
        undos: list[tuple[str, Callable[[C], None]]] = []
        current = self.steps[0].name if self.steps else ""
        # One handler around the whole loop: a Ctrl-C between two steps is compensated too.
        try:
            for step in self.steps:
                current = step.name
                if step.undo is not None and not step.atomic:
                    undos.append((step.name, step.undo))
                if not step.action(ctx):
                    raise _NoWork()
                if step.undo is not None and step.atomic:
                    undos.append((step.name, step.undo))
                self.completed.append(step.name)
        except _NoWork:
            raise self._fail(ctx, current, NO_WORK, undos, fence, on_failure) from None
        except BaseException as exc:  # Ctrl-C and SIGTERM must be compensated too
            raise self._fail(ctx, current, exc, undos, fence, on_failure) from exc

    def _fail(
        self,
        ctx: C,
        step: str,
        cause: BaseException | str,
        undos: list[tuple[str, Callable[[C], None]]],
        fence: Callable[[C], None] | None,
        on_failure: Callable[[StepFailed], None] | None,
    ) -> StepFailed:
        # A second Ctrl-C or a SIGTERM must not leave a half-undone, unrecorded dispatch.
        with ignored_signals():
            errors: list[str] = []
            if fence is not None:
                try:
                    fence(ctx)
                except Exception as exc:
                    errors.append(f"fence: {describe(exc)}")
            for name, undo in reversed(undos):
                try:
                    undo(ctx)
                except Exception as exc:
                    errors.append(f"undo {name}: {describe(exc)}")
                    if self.on_undo_error is not None:
                        self.on_undo_error(name, exc)
            failure = StepFailed(step, cause, errors)
            if on_failure is not None:
                try:
                    on_failure(failure)
                except Exception as exc:
                    # Reported with the failure; the original error must stay the headline.
                    errors.append(f"recording the failure: {describe(exc)}")
        return failure


_TERMINATING = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _handling(signals: tuple[int, ...], handler: signal.Handlers | Any) -> Iterator[None]:
    """Install `handler` for `signals` for the block, then restore what was there."""
    try:
        previous = {s: signal.signal(s, handler) for s in signals}
    except ValueError:  # not the main thread, where signals cannot be handled anyway
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def signals_interrupt() -> AbstractContextManager[None]:
    """Turn SIGTERM and SIGHUP into `Interrupted` (SIGINT is KeyboardInterrupt already)."""

    def handler(signum: int, _frame: FrameType | None) -> None:
        raise Interrupted(signum)

    return _handling(_TERMINATING, handler)


def ignored_signals() -> AbstractContextManager[None]:
    """Ignore SIGINT, SIGTERM and SIGHUP for the block: the process is already unwinding."""
    return _handling((signal.SIGINT, *_TERMINATING), signal.SIG_IGN)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C, SIGTERM and SIGHUP for the block, then deliver the first one again to
    whatever handles it outside: for work that must not be cut off between doing and
    recording that it was done (a claim that committed must be known, to be undone)."""
    held: list[int] = []

    def hold(signum: int, _frame: FrameType | None) -> None:
        held.append(signum)

    with _handling((signal.SIGINT, *_TERMINATING), hold):
        yield
    if held:
        signal.raise_signal(held[0])  # handled here and now, by the handler put back
