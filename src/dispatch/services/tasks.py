"""Creating, showing and archiving tasks; resetting them after a failure."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from dispatch.app import App
from dispatch.clock import utcnow
from dispatch.errors import Conflict, EnvironmentProblem, UsageError
from dispatch.lifecycle import Action, Status, next_status
from dispatch.services.sweep import reconcile
from dispatch.store import pages
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
    # How many older events a limit on `events` left out.
    events_more: int = 0


@dataclass(frozen=True)
class Page:
    """What a limited read printed, and how many more matched."""

    shown: int
    more: int


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
    top = _repository_of(app, app.worktrees.toplevel(where))
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


def _repository_of(app: App, top: Path) -> Path:
    """The repository a task belongs to. A worktree dispatch made for another task stands
    for the repository it was made from: gc removes it, and the task would lose its repo."""
    root = app.settings.worktree_root.expanduser().resolve()
    if top == root or not top.is_relative_to(root):
        return top
    return app.worktrees.list_worktrees(top)[0]  # git lists the main worktree first


def list_tasks(
    app: App,
    statuses: Sequence[str] = (),
    include_closed: bool = False,
    *,
    reap: bool = True,
    repo: str | None = None,
    agent: str | None = None,
    host: str | None = None,
    limit: int | None = None,
) -> list[TaskSummary]:
    """Tasks as `list` shows them, in the order `run --next` takes them, true when read."""
    found: list[TaskSummary] = []
    query = task_query(statuses, include_closed, repo=repo, agent=agent, host=host)
    stream_task_list(app, found.append, query, limit=limit, reap=reap)
    return found


def task_query(
    statuses: Sequence[str] = (),
    include_closed: bool = False,
    *,
    repo: str | None = None,
    agent: str | None = None,
    host: str | None = None,
) -> pages.TaskQuery:
    """The filters of `list`, checked."""
    valid = {s.value for s in Status}
    for status in statuses:
        if status not in valid:
            raise UsageError(f"unknown status {status!r} (one of: {', '.join(sorted(valid))})")
    return pages.TaskQuery(tuple(sorted(set(statuses))), include_closed, repo, agent, host)


def stream_task_list(
    app: App,
    each: Callable[[TaskSummary], None],
    query: pages.TaskQuery,
    *,
    limit: int | None = None,
    reap: bool = True,
) -> Page:
    """Hand each matching task to `each` as it is read (at most `limit`); memory stays flat."""
    if limit is not None and limit < 0:
        raise UsageError("the limit must be 0 or more")
    if reap:
        reconcile(app)

    def work(tx: Tx) -> Page:
        shown = 0
        for task in pages.stream_tasks(tx, query, limit):
            each(task)
            shown += 1
        more = 0
        if limit is not None and shown == limit:
            more = pages.count_tasks(tx, query) - shown
        return Page(shown, more)

    return app.direct.read(work)


def show_task(app: App, task_id: int, *, reap: bool = True, events: int | None = None) -> TaskView:
    """A task with its attempts and events (with `events`, the newest that many), true
    when read (this host's dead agents reaped)."""
    if events is not None and events < 0:
        raise UsageError("the number of events must be 0 or more")
    if reap:
        reconcile(app)

    def work(tx: Tx) -> TaskView:
        from dispatch.store.collected import is_collected, last_collection

        task = st.get_task(tx, task_id)
        attempts = st.attempts_of(tx, task_id)
        shown = st.events(tx, task_id, events)
        more = 0
        if events is not None and len(shown) == events and shown:
            more = pages.count_events_before(tx, pages.EventQuery(task_id), shown[0].id)
        notices = []
        # A worktree that is there was not collected (or is back): no query for most tasks.
        gone = task.worktree is not None and not Path(task.worktree).is_dir()
        if gone and is_collected(last_collection(tx, task_id)):
            # The task still names its worktree: that is where `restore` puts it back.
            notices.append(
                f"worktree {task.worktree} was collected by gc; "
                f"`dispatch restore {task_id}` brings it back"
            )
        return TaskView(task, attempts, shown, notices=notices, events_more=more)

    return app.direct.read(work)


def list_events(app: App, task_id: int | None = None, limit: int | None = None) -> list[EventRow]:
    def work(tx: Tx) -> list[EventRow]:
        if task_id is not None:
            st.get_task(tx, task_id)
        return st.events(tx, task_id, limit)

    return app.direct.read(work)


def event_query(
    task_id: int | None = None,
    after: int | None = None,
    since: str | None = None,
    *,
    now: datetime | None = None,
) -> pages.EventQuery:
    """The filters of `events`, checked; `since` is a duration back from now or a time."""
    return pages.EventQuery(task_id, after, None if since is None else parse_since(since, now))


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """`10m`, `2d` (back from now) or an ISO 8601 time (UTC unless it names its offset)."""
    from dispatch.config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        return (now or datetime.now(UTC)) - timedelta(seconds=seconds)
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            f"--since {text!r} is neither a duration (10m, 2h, 7d) nor a time "
            "(2026-12-01T09:30:00Z)"
        ) from None
    return when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)


def stream_event_log(
    app: App,
    each: Callable[[Sequence[pages.EventLine]], None],
    query: pages.EventQuery,
    *,
    limit: int | None = None,
) -> tuple[Page, int]:
    """Hand the matching events to `each`, a batch at a time, oldest first (with
    `limit`, the newest that many); also the highest event id seen so far, where a
    follow carries on."""
    if limit is not None and limit < 0:
        raise UsageError("the limit must be 0 or more")

    def work(tx: Tx) -> tuple[Page, int]:
        if query.task_id is not None:
            st.get_task(tx, query.task_id)
        # In the same snapshot as the page: a follow carries on from here, missing nothing.
        last = pages.last_event_id(tx)
        shown, first = 0, None
        for batch in pages.stream_event_batches(tx, query, limit, upto=last):
            first = batch[0].id if first is None else first
            each(batch)
            shown += len(batch)
        more = 0
        if limit is not None and shown == limit and first is not None:
            more = pages.count_events_before(tx, query, first)
        return Page(shown, more), last

    return app.direct.read(work)


def _new_events(query: pages.EventQuery, tx: Tx) -> list[pages.EventLine]:
    return list(pages.stream_events(tx, query, None))


# How often `events --follow` looks for new events: one indexed read of `id > last`.
FOLLOW_POLL_SECONDS = 0.2


def follow_event_log(
    app: App,
    each: Callable[[Sequence[pages.EventLine]], None],
    query: pages.EventQuery,
    after: int,
    *,
    flush: Callable[[], None] = lambda: None,
    poll: float = FOLLOW_POLL_SECONDS,
) -> None:
    """Hand the new events to `each` as they are written, until interrupted (Ctrl-C)."""
    last = after
    while True:
        # New events are later than any `since`: the id alone says what is new.
        news = pages.EventQuery(query.task_id, last)
        found = app.direct.read(partial(_new_events, news))
        if found:
            each(found)
            last = found[-1].id
            flush()
        time.sleep(poll)


def reset_task(app: App, task_id: int, *, expected_attempt: int | None = None) -> TaskRow:
    """A failed, incomplete, interrupted or cancelled task back to `ready`; with
    `expected_attempt`, only while the task's latest attempt is that one."""

    def work(tx: Tx) -> TaskRow:
        task = st.get_task(tx, task_id)
        if expected_attempt is not None:
            st.expect_latest_attempt(tx, task, expected_attempt)
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
