"""Creating, showing and archiving tasks; resetting them after a failure."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session

from dispatch.app import App
from dispatch.errors import Conflict, EnvironmentProblem, UsageError
from dispatch.lifecycle import Action, Status, next_status
from dispatch.store import queries as q
from dispatch.store.direct import utcnow
from dispatch.store.models import Attempt, Event, Task


@dataclass
class TaskView:
    """A task with what `show` and `run` print alongside it."""

    task: Task
    attempts: list[Attempt] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)


def add_task(
    app: App,
    title: str,
    *,
    prompt: str | None = None,
    repo: Path | None = None,
    agent: str | None = None,
    base: str | None = None,
    priority: int = 0,
) -> Task:
    """Create a `ready` task in a git repository (default: the cwd's)."""
    if not title.strip():
        raise UsageError("the title is empty")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty")
    agent = agent or app.settings.default_agent
    if agent not in app.settings.agents:
        known = ", ".join(sorted(app.settings.agents))
        raise UsageError(f"unknown agent profile {agent!r} (known: {known})")
    top = app.worktrees.toplevel((repo or Path.cwd()).expanduser().resolve())
    if base is None:
        base = app.worktrees.head_ref(top)
        # A repository without commits names a branch that does not exist yet.
        if not app.worktrees.ref_exists(top, base):
            raise EnvironmentProblem(
                f"{top} has no commits yet, so a task has nothing to start from",
                hint="commit something first",
            )
    elif not app.worktrees.ref_exists(top, base):
        raise UsageError(f"base ref {base!r} does not exist in {top}")

    def work(s: Session) -> Task:
        now = utcnow()
        task = Task(
            title=title,
            prompt=title if prompt is None else prompt,
            repo=str(top),
            agent=agent,
            base_ref=base,
            priority=priority,
            status=Status.READY.value,
            dispatch_failures=0,
            created_at=now,
            updated_at=now,
        )
        s.add(task)
        s.flush()
        q.record_event(s, "created", task_id=task.id, to_status=Status.READY.value)
        return task

    return app.db.write(work)


def show_task(app: App, task_id: int) -> TaskView:
    def work(s: Session) -> TaskView:
        task = q.get_task(s, task_id)
        attempts = q.attempts_of(s, [task_id])[task_id]
        return TaskView(task, attempts, q.events(s, task_id))

    return app.db.read(work)


def list_events(app: App, task_id: int | None = None, limit: int | None = None) -> list[Event]:
    def work(s: Session) -> list[Event]:
        if task_id is not None:
            q.get_task(s, task_id)
        return q.events(s, task_id, limit)

    return app.db.read(work)


def reset_task(app: App, task_id: int) -> Task:
    """A failed, incomplete, interrupted or cancelled task back to `ready`."""

    def work(s: Session) -> Task:
        task = q.get_task(s, task_id)
        current = Status(task.status)
        target = next_status(
            current, Action.RESET, closed=task.closed_at is not None, task_id=task_id
        )
        if not q.move_task(s, task_id, expected=current, target=target, dispatch_failures=0):
            raise Conflict(f"task {task_id} changed while resetting it; try again")
        q.record_event(s, "reset", task_id=task_id, from_status=current, to_status=target)
        return q.get_task(s, task_id)

    return app.db.write(work)


def reopen_task(app: App, task_id: int) -> TaskView:
    """Unarchive a task; it keeps its status. Reopening an open task is a no-op."""

    def work(s: Session) -> TaskView:
        task = q.get_task(s, task_id)
        if task.closed_at is None:
            return TaskView(task, notices=[f"task {task_id} is not closed"])
        q.update_task(s, task_id, closed_at=None)
        q.record_event(
            s, "reopened", task_id=task_id, from_status=task.status, to_status=task.status
        )
        return TaskView(q.get_task(s, task_id))

    return app.db.write(work)
