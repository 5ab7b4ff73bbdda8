"""Creating, showing and archiving tasks; resetting them after a failure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import Conflict, EnvironmentProblem, UsageError
from dispatch.lifecycle import Action, Status, next_status
from dispatch.services.sweep import reconcile
from dispatch.store import statements as st
from dispatch.store.direct import Tx
from dispatch.store.statements import AttemptRow, EventRow, TaskRow, TaskSummary

# What every database dispatch runs on stores in an INTEGER column.
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1


@dataclass
class TaskView:
    """A task with what `show` and `run` print alongside it."""

    task: TaskRow
    attempts: list[AttemptRow] = field(default_factory=list)
    events: list[EventRow] = field(default_factory=list)
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
) -> TaskRow:
    """Create a `ready` task in a git repository (default: the cwd's)."""
    if not title.strip():
        raise UsageError("the title is empty")
    if prompt is not None and not prompt.strip():
        raise UsageError("the prompt is empty")
    for name, text in (("title", title), ("prompt", prompt or "")):
        if "\0" in text:
            # No program can be handed it: an argv element ends at the first NUL.
            raise UsageError(f"the {name} contains a NUL byte, which no agent can receive")
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise UsageError(f"the priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}")
    agent = agent or app.settings.default_agent
    if agent not in app.settings.agents:
        known = ", ".join(sorted(app.settings.agents))
        raise UsageError(f"unknown agent profile {agent!r} (known: {known})")
    where = (repo or Path.cwd()).expanduser().resolve()
    if where.exists() and not where.is_dir():
        raise EnvironmentProblem(f"{where} is not a directory, so it is not a git repository")
    top = app.worktrees.toplevel(where)
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

    def work(tx: Tx) -> TaskRow:
        now = utcnow()
        task_id = st.insert_task(
            tx,
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
        st.record_event(tx, "created", task_id=task_id, to_status=Status.READY.value)
        return st.get_task(tx, task_id)

    return app.direct.write(work)


def list_tasks(
    app: App, statuses: Sequence[str] = (), include_closed: bool = False, *, reap: bool = True
) -> list[TaskSummary]:
    """Tasks as `list` shows them, in the order `run --next` takes them, true when read."""
    valid = {s.value for s in Status}
    for status in statuses:
        if status not in valid:
            raise UsageError(f"unknown status {status!r} (one of: {', '.join(sorted(valid))})")
    wanted = sorted(set(statuses))
    if reap:
        reconcile(app)
    return app.direct.read(lambda tx: st.list_tasks(tx, wanted, include_closed))


def show_task(app: App, task_id: int, *, reap: bool = True) -> TaskView:
    """A task with its attempts and events, true when read (this host's dead agents reaped)."""
    if reap:
        reconcile(app)

    def work(tx: Tx) -> TaskView:
        task = st.get_task(tx, task_id)
        attempts = st.attempts_of(tx, task_id)
        return TaskView(task, attempts, st.events(tx, task_id))

    return app.direct.read(work)


def list_events(app: App, task_id: int | None = None, limit: int | None = None) -> list[EventRow]:
    def work(tx: Tx) -> list[EventRow]:
        if task_id is not None:
            st.get_task(tx, task_id)
        return st.events(tx, task_id, limit)

    return app.direct.read(work)


def reset_task(app: App, task_id: int) -> TaskRow:
    """A failed, incomplete, interrupted or cancelled task back to `ready`."""

    def work(tx: Tx) -> TaskRow:
        task = st.get_task(tx, task_id)
        current = Status(task.status)
        target = next_status(
            current, Action.RESET, closed=task.closed_at is not None, task_id=task_id
        )
        if not st.move_task(tx, task_id, expected=current, target=target, dispatch_failures=0):
            raise Conflict(f"task {task_id} changed while resetting it; try again")
        st.record_event(tx, "reset", task_id=task_id, from_status=current, to_status=target)
        return st.get_task(tx, task_id)

    return app.direct.write(work)


def reopen_task(app: App, task_id: int) -> TaskView:
    """Unarchive a task; it keeps its status. Reopening an open task is a no-op."""

    def work(tx: Tx) -> TaskView:
        task = st.get_task(tx, task_id)
        if task.closed_at is None:
            return TaskView(task, notices=[f"task {task_id} is not closed"])
        st.update_task(tx, task_id, closed_at=None)
        st.record_event(
            tx, "reopened", task_id=task_id, from_status=task.status, to_status=task.status
        )
        return TaskView(st.get_task(tx, task_id))

    return app.direct.write(work)
