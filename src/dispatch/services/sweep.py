"""`dispatch sweep`: no task stays in-progress without a live agent (SPEC §4).

One tmux listing and a constant number of queries decide; each reap is one
conditional write with one event, so concurrent sweeps reap a task once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from dispatch.adapters.protocols import Pane
from dispatch.app import App
from dispatch.errors import DispatchError
from dispatch.lifecycle import Action, AttemptState, Outcome, Status, next_status
from dispatch.services.cleanup import remove_created, remove_prompt, roll_back
from dispatch.services.naming import WRAPPER_MARKER
from dispatch.services.processes import process_alive
from dispatch.store import queries as q
from dispatch.store.models import Attempt, Task, utcnow

# How long a sweep waits for another sweep that is finishing an undo on this host.
UNDO_LOCK_SECONDS = 60.0
_TASK_DIR = re.compile(r"task-(\d+)")


@dataclass(frozen=True)
class Reap:
    task_id: int
    attempt_id: int | None
    reason: str
    status: str


@dataclass
class SweepReport:
    checked: int = 0
    reaped: list[Reap] = field(default_factory=list)
    orphan_windows: list[str] = field(default_factory=list)
    orphan_worktrees: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return {
            "checked": self.checked,
            "reaped": [
                {
                    "task_id": r.task_id,
                    "attempt_id": r.attempt_id,
                    "reason": r.reason,
                    "status": r.status,
                }
                for r in self.reaped
            ],
            "orphan_windows": self.orphan_windows,
            "orphan_worktrees": self.orphan_worktrees,
        }


@dataclass
class _Snapshot:
    live: list[tuple[Attempt, Task]]
    stuck: list[tuple[Task, Attempt | None]]
    # Task directories under worktree_root that belong to no task.
    orphan_dirs: list[str]


def _task_dirs(root: Path) -> list[tuple[Path, int | None]]:
    """`<worktree_root>/<repo-name>/task-N` directories, with N when it is a number."""
    root = root.expanduser()
    if not root.is_dir():
        return []
    found = []
    for path in sorted(root.resolve().glob("*/task-*")):
        if path.is_dir():
            match = _TASK_DIR.fullmatch(path.name)
            found.append((path, int(match[1]) if match else None))
    return found


def _snapshot(s: Session, dirs: list[tuple[Path, int | None]]) -> _Snapshot:
    live_rows = s.execute(
        select(Attempt, Task)
        .join(Task, Task.id == Attempt.task_id)
        .where(Attempt.state != AttemptState.ENDED.value)
        .order_by(Attempt.id)
    ).all()
    # In-progress tasks whose attempt has ended: a dispatcher or sweep died mid-rollback.
    rows = s.execute(
        select(Task, Attempt)
        .outerjoin(Attempt, Attempt.id == Task.current_attempt_id)
        .where(Task.status == Status.IN_PROGRESS.value)
        .where((Attempt.id.is_(None)) | (Attempt.state == AttemptState.ENDED.value))
    ).all()
    ids = sorted({n for _, n in dirs if n is not None})
    repos: dict[int, str] = {}
    if ids:
        found = s.execute(select(Task.id, Task.repo).where(Task.id.in_(ids)))
        repos = {task_id: repo for task_id, repo in found}
    # A directory belongs to a task when both the id and the repository's name match.
    orphans = [
        str(path)
        for path, n in dirs
        if n is None or n not in repos or Path(repos[n]).name != path.parent.name
    ]
    return _Snapshot([(a, t) for a, t in live_rows], [(t, a) for t, a in rows], orphans)


def _attempt_of(pane: Pane) -> int | None:
    """The attempt a pane's wrapper runs for, from its start command `… agent-exec ID`."""
    parts = pane.start_command.rsplit(" ", 2)
    if len(parts) == 3 and parts[1] == WRAPPER_MARKER and parts[2].isdigit():
        return int(parts[2])
    return None


def _window(attempt: Attempt) -> str | None:
    return attempt.tmux_target.rsplit(":", 1)[-1] if attempt.tmux_target else None


@dataclass
class _Panes:
    """The one tmux listing, indexed the ways the sweep needs."""

    all: list[Pane]
    by_window: dict[str, Pane]
    by_attempt: dict[int, list[Pane]]

    @classmethod
    def of(cls, panes: list[Pane]) -> _Panes:
        by_attempt: dict[int, list[Pane]] = {}
        for pane in panes:
            attempt_id = _attempt_of(pane)
            if attempt_id is not None:
                by_attempt.setdefault(attempt_id, []).append(pane)
        return cls(panes, {p.window_id: p for p in panes}, by_attempt)

    def of_attempt(self, attempt: Attempt) -> Pane | None:
        """The pane running this attempt's wrapper, if there is one."""
        window = _window(attempt)
        if window is not None:
            pane = self.by_window.get(window)
            # After a tmux server restart a window id can name another window: only a
            # pane that runs this very attempt's wrapper is this attempt's.
            return pane if pane is not None and _attempt_of(pane) == attempt.id else None
        # The dispatcher died before it recorded the window: find it by its command.
        for pane in self.by_attempt.get(attempt.id, []):
            if pane.session == attempt.tmux_session:
                return pane
        return None


def sweep(
    app: App, *, dry_run: bool = False, requeue: bool = False, stale_after: float | None = None
) -> SweepReport:
    """Reap what has no live agent; report orphans; change nothing with `dry_run`."""
    settings = app.settings
    stale = timedelta(seconds=settings.stale_after if stale_after is None else stale_after)
    dirs = _task_dirs(settings.worktree_root)
    # The snapshot comes before the listing: a window an attempt had when it was read
    # must show in the listing unless it has really gone since.
    snap = app.db.read(lambda s: _snapshot(s, dirs))
    panes = _Panes.of(app.terminal.list_panes())
    now = utcnow()
    report = SweepReport(checked=len(snap.live) + len(snap.stuck))

    for attempt, task in snap.live:
        reason = _verdict(app, attempt, panes, now, stale)
        if reason is None:
            continue
        if dry_run:
            status = _would_be(app, attempt, task, requeue)
            report.reaped.append(Reap(attempt.task_id, attempt.id, reason, status))
            continue
        if attempt.state == AttemptState.STARTING.value:
            reap = _reap_dispatch(app, attempt, reason, panes, report)
        else:
            reap = _reap_running(app, attempt, reason, requeue)
        if reap is not None:
            report.reaped.append(reap)

    for stuck_task, ended in snap.stuck:
        if ended is not None and _rollback_under_way(app, ended, now):
            continue
        reason = "rollback never finished" if ended else "in-progress without an attempt"
        if dry_run:
            status = _rollback_status(app, ended, stuck_task) if ended else Status.INTERRUPTED.value
            report.reaped.append(Reap(stuck_task.id, ended.id if ended else None, reason, status))
            continue
        reap = _reap_stuck(app, stuck_task, ended, reason, panes, report)
        if reap is not None:
            report.reaped.append(reap)

    report.orphan_windows = _orphan_windows(app, panes, [a for a, _ in snap.live])
    report.orphan_worktrees = snap.orphan_dirs
    return report


def _judged_by_tmux(app: App, attempt: Attempt) -> bool:
    """Whether this sweep's tmux listing can tell if the attempt's agent is alive."""
    if attempt.host != app.settings.host:
        return False
    # An attempt started on another tmux server (the socket setting changed) is not in
    # our listing: its absence there proves nothing, so it is judged by heartbeat.
    return (attempt.tmux_socket or "") == (app.settings.tmux_socket or "")


def _verdict(
    app: App, attempt: Attempt, panes: _Panes, now: datetime, stale: timedelta
) -> str | None:
    """Why this attempt has no live agent, or None if it may well have one."""
    if attempt.state == AttemptState.STARTING.value:
        lease = attempt.lease_expires_at
        if lease is not None and lease > now:
            return None
        if attempt.host == app.settings.host:
            if process_alive(attempt.dispatcher_pid, attempt.started_at):
                return None  # a slow step on this host: its dispatcher is still at work
            return "dispatcher died"
        # Another host's dispatch: its own sweep, which can undo it, gets the first turn.
        if now - (lease or attempt.started_at) <= stale:
            return None
        return "dispatcher died"
    if _judged_by_tmux(app, attempt):
        # tmux is the authority here; a live pane is never reaped, however old its heartbeat.
        pane = panes.of_attempt(attempt)
        if pane is None:
            return "agent window gone"
        if pane.dead:
            return "agent pane dead without a recorded exit"
        return None
    beat = attempt.heartbeat_at or attempt.started_at
    if now - beat > stale:
        return f"heartbeat older than {int(stale.total_seconds())}s (host {attempt.host})"
    return None


def _rollback_status(app: App, attempt: Attempt, task: Task) -> str:
    """The status a rollback of this attempt leaves (the failure cap included)."""
    return next_status(
        Status.IN_PROGRESS,
        Action.ROLLBACK,
        prior=Status(attempt.prior_status),
        failures=task.dispatch_failures + 1,
        max_failures=app.settings.max_dispatch_failures,
        task_id=task.id,
    ).value


def _would_be(app: App, attempt: Attempt, task: Task, requeue: bool) -> str:
    if attempt.state == AttemptState.STARTING.value:
        return _rollback_status(app, attempt, task)
    if attempt.cancel_requested_at is not None:
        return Status.CANCELLED.value
    return Status.READY.value if requeue else Status.INTERRUPTED.value


def _reap_running(app: App, attempt: Attempt, reason: str, requeue: bool) -> Reap | None:
    # A cancel was asked for and the agent is gone: that is what the user wanted.
    cancelled = attempt.cancel_requested_at is not None
    if cancelled:
        action, outcome = Action.CANCEL, Outcome.CANCELLED
    else:
        action, outcome = (Action.REQUEUE if requeue else Action.REAP), Outcome.INTERRUPTED

    def work(s: Session) -> Reap | None:
        if not q.move_attempt(
            s,
            attempt.id,
            expected=[AttemptState.RUNNING],
            target=AttemptState.ENDED,
            outcome=outcome.value,
            ended_at=utcnow(),
            error=reason,
        ):
            return None  # another sweep, or the wrapper itself, got there first
        target = next_status(Status.IN_PROGRESS, action, task_id=attempt.task_id)
        if not q.release_task(
            s,
            attempt.task_id,
            attempt_id=attempt.id,
            target=target,
            kind="reaped",
            values={"last_error": f"{outcome.value}: {reason}"},
            reason=reason,
        ):
            return None  # a superseded attempt: its end is recorded, the task is not ours
        return Reap(attempt.task_id, attempt.id, reason, target.value)

    return app.db.write(work)


def _reap_dispatch(
    app: App, attempt: Attempt, reason: str, panes: _Panes, report: SweepReport
) -> Reap | None:
    """A dispatcher died mid-saga: fence its attempt, finish its undo, roll back."""
    won = app.db.write(
        lambda s: q.move_attempt(
            s,
            attempt.id,
            expected=[AttemptState.STARTING],
            target=AttemptState.ENDED,
            outcome=Outcome.DISPATCH_FAILED.value,
            ended_at=utcnow(),
            error=reason,
        )
    )
    if not won:
        return None  # another sweep, or its wrapper acknowledging, got there first
    return _finish_undo(app, attempt.id, reason, panes, report)


def _rollback_under_way(app: App, attempt: Attempt, now: datetime) -> bool:
    """Whether someone alive may still be rolling this attempt back (never reap it then)."""
    if attempt.lease_expires_at is not None and attempt.lease_expires_at > now:
        return True
    local = attempt.host == app.settings.host
    return local and process_alive(attempt.dispatcher_pid, attempt.started_at)


def _reap_stuck(
    app: App,
    task: Task,
    attempt: Attempt | None,
    reason: str,
    panes: _Panes,
    report: SweepReport,
) -> Reap | None:
    if attempt is not None:
        return _finish_undo(app, attempt.id, attempt.error or reason, panes, report)

    def work(s: Session) -> Reap | None:
        target = next_status(Status.IN_PROGRESS, Action.REAP, task_id=task.id)
        if not q.release_task(
            s,
            task.id,
            attempt_id=None,
            target=target,
            kind="reaped",
            values={"last_error": reason},
            reason=reason,
        ):
            return None
        return Reap(task.id, None, reason, target.value)

    return app.db.write(work)


def _still_to_undo(app: App, attempt_id: int) -> Attempt | None:
    """The attempt, if its task still waits for this attempt's rollback."""

    def work(s: Session) -> Attempt | None:
        attempt = q.get_attempt(s, attempt_id)
        task = q.get_task(s, attempt.task_id)
        pending = (
            attempt.state == AttemptState.ENDED.value
            and task.status == Status.IN_PROGRESS.value
            and task.current_attempt_id == attempt_id
        )
        return attempt if pending else None

    return app.db.read(work)


def _finish_undo(
    app: App, attempt_id: int, reason: str, panes: _Panes, report: SweepReport
) -> Reap | None:
    """Undo, from the write-ahead intent, what a dead dispatch created; then roll back.

    Serialised on this host and re-checked under the lock: a sweep working from an
    older snapshot must never undo a rollback that already happened, because the task
    may have been dispatched again into the same worktree and branch since.
    """
    from filelock import FileLock, Timeout

    settings = app.settings
    settings.locks_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        with FileLock(str(settings.locks_dir / "sweep-undo.lock"), timeout=UNDO_LOCK_SECONDS):
            attempt = _still_to_undo(app, attempt_id)
            if attempt is None:
                return None
            if attempt.host == settings.host:
                report.problems.extend(_undo_here(app, attempt, panes))
            elif (attempt.intent or {}).get("worktree"):
                report.problems.append(
                    f"attempt {attempt_id}: worktree {attempt.intent['worktree']} and branch "
                    f"{attempt.intent.get('branch')} were made on {attempt.host}; "
                    "a sweep there cannot undo them any more, check them by hand"
                )
            status = roll_back(app, attempt_id, reason, {"step": "sweep"})
    except Timeout:
        report.problems.append(f"attempt {attempt_id}: another sweep is still undoing it")
        return None
    if status is None:
        return None
    return Reap(attempt.task_id, attempt_id, reason, status.value)


def _undo_here(app: App, attempt: Attempt, panes: _Panes) -> list[str]:
    """Kill the attempt's window, remove its prompt file, worktree and branch it created."""
    problems: list[str] = []
    intent = attempt.intent or {}
    try:
        # Only windows that run this very attempt's wrapper: a window id from the intent
        # may have been reused by a newer tmux server for another task's agent.
        session = intent.get("session") or attempt.tmux_session
        for pane in panes.by_attempt.get(attempt.id, []):
            if pane.session == session:
                app.terminal.kill_window(pane.window_id)
    except DispatchError as exc:
        problems.append(f"attempt {attempt.id}: undo window: {exc.message}")
    try:
        if intent.get("worktree"):
            problems.extend(
                remove_created(app, intent, agent_started=attempt.agent_pid is not None)
            )
    except DispatchError as exc:
        problems.append(f"attempt {attempt.id}: undo worktree: {exc.message}")
    remove_prompt(app, attempt.id)
    return problems


def _orphan_windows(app: App, panes: _Panes, live: list[Attempt]) -> list[str]:
    """Windows running a dispatch wrapper whose attempt is no longer live; never killed."""
    owned = {a.id for a in live}
    owned_windows = {_window(a) for a in live if _judged_by_tmux(app, a)}
    found: list[str] = []
    for pane in panes.all:
        attempt_id = _attempt_of(pane)
        if attempt_id is None:
            continue  # the user's own windows, or a shell they opened in the session
        if attempt_id in owned or pane.window_id in owned_windows:
            continue
        label = f"{pane.session}:{pane.window_id} ({pane.window_name})"
        if label not in found:
            found.append(label)
    return found
