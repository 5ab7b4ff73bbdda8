"""What the monitor reads and checks that no CLI command needs: the board, the feed,
the diff, the log tail and the page's "expected attempt"."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dispatch.app import App
from dispatch.errors import NotFound
from dispatch.services.control import log_path
from dispatch.services.sweep import reconcile
from dispatch.services.tasks import task_query
from dispatch.store import pages
from dispatch.store import statements as st
from dispatch.store.pages import StoredRow
from dispatch.store.statements import AttemptSummary, EventRow, TaskSummary


@dataclass(frozen=True)
class BoardRow:
    task: TaskSummary
    attempt: AttemptSummary | None


@dataclass(frozen=True)
class Board:
    """The board's rows as stored, and the database's version they were read at (None
    when the executor cannot tell): an answer made from them holds while it is the same."""

    version: Hashable | None
    rows: list[StoredRow] | None  # None: unchanged since `unchanged_since`


def stored_board(
    app: App,
    statuses: Sequence[str] = (),
    include_closed: bool = False,
    *,
    unchanged_since: Hashable | None = None,
) -> Board:
    """`list`'s tasks, each with its latest attempt, as stored: read in one transaction,
    once this host's dead agents are reaped (as every read does). Not read again when
    the database is still at `unchanged_since`."""
    query = task_query(statuses, include_closed)
    reconcile(app)
    # Taken before the read: a commit landing during it changes the next version, so
    # the rows are never taken for newer than they are.
    version = app.direct.version()
    if version is not None and version == unchanged_since:
        return Board(version, None)

    return Board(version, app.direct.read(lambda tx: list(pages.stream_board(tx, query))))


def board_row(row: StoredRow) -> BoardRow:
    task, attempt = pages.board_parts(row)
    return BoardRow(
        pages.task_summary(task), None if attempt is None else st.attempt_summary(attempt)
    )


def events_after(
    app: App, after: int, task_id: int | None = None, limit: int = 1000
) -> list[EventRow]:
    return app.direct.read(lambda tx: st.events_after(tx, after, task_id, limit))


def last_event_id(app: App) -> int:
    return app.direct.read(st.last_event_id)


def log_tail(app: App, task_id: int, number: int | None, tail: int | None) -> bytes:
    """The last `tail` bytes (all without it) of an attempt's pane log."""
    attempt, path = log_path(app, task_id, number)
    try:
        with path.open("rb") as handle:
            if tail is not None:
                size = handle.seek(0, 2)
                handle.seek(max(0, size - tail))
            return handle.read()
    except FileNotFoundError:
        raise NotFound(f"attempt {attempt.number} of task {task_id} has no log yet") from None


def task_diff(app: App, task_id: int) -> str:
    """What the agent changed: its branch against the merge base with base_ref, then the
    worktree's uncommitted changes, as one unified diff."""
    from dispatch.adapters.gitdiff import GitChanges

    task = app.direct.read(lambda tx: st.get_task(tx, task_id))
    if not task.branch:
        raise NotFound(f"task {task_id} has no branch yet: it has not been dispatched")
    worktree = Path(task.worktree) if task.worktree else None
    snapshot = None
    if worktree is not None and not worktree.is_dir():
        # Collected by gc: what was uncommitted is in its snapshot, not lost from the diff.
        from dispatch.store.collected import is_collected, last_collection

        last = app.direct.read(lambda tx: last_collection(tx, task_id))
        if last is not None and is_collected(last):
            commit = last.detail.get("commit")
            snapshot = commit if isinstance(commit, str) else None
    changes = GitChanges(app.settings.locks_dir)
    return changes.diff(Path(task.repo), task.branch, task.base_ref, worktree, snapshot)
