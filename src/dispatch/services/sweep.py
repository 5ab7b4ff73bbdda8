"""`dispatch sweep`: no task stays in-progress without a live agent (SPEC §4).

One tmux listing and a constant number of queries decide; each reap is one
conditional write with one event, so concurrent sweeps reap a task once.
"""

from __future__ import annotations

import os
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
from dispatch.services.dispatching import WRAPPER_MARKER, prompt_path, remove_created, roll_back
from dispatch.store import queries as q
from dispatch.store.models import Attempt, Task, utcnow


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
    live: list[Attempt]
    stuck: list[tuple[Task, Attempt | None]]
    worktrees: set[str]


def _snapshot(s: Session) -> _Snapshot:
    live = list(q.live_attempts(s))
    # In-progress tasks whose attempt has ended: a dispatcher or sweep died mid-rollback.
    rows = s.execute(
        select(Task, Attempt)
        .outerjoin(Attempt, Attempt.id == Task.current_attempt_id)
        .where(Task.status == Status.IN_PROGRESS.value)
        .where((Attempt.id.is_(None)) | (Attempt.state == AttemptState.ENDED.value))
    ).all()
    worktrees = q.known_worktrees(s) | {a.worktree for a in live if a.worktree}
    return _Snapshot(live, [(t, a) for t, a in rows], worktrees)


def _pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _window(attempt: Attempt) -> str | None:
    return attempt.tmux_target.rsplit(":", 1)[-1] if attempt.tmux_target else None


def sweep(
    app: App, *, dry_run: bool = False, requeue: bool = False, stale_after: float | None = None
) -> SweepReport:
    settings = app.settings
    stale = timedelta(seconds=settings.stale_after if stale_after is None else stale_after)
    snap = app.db.read(_snapshot)
    panes = app.terminal.list_panes()
    by_window = {p.window_id: p for p in panes}
    now = utcnow()
    report = SweepReport(checked=len(snap.live) + len(snap.stuck))

    for attempt in snap.live:
        local = attempt.host == settings.host
        reason = _verdict(attempt, local, by_window, now, stale)
        if reason is None:
            continue
        if dry_run:
            report.reaped.append(
                Reap(attempt.task_id, attempt.id, reason, _would_be(attempt, requeue))
            )
            continue
        if attempt.state == AttemptState.STARTING.value:
            reap = _reap_dispatch(app, attempt, reason, local, report)
        else:
            reap = _reap_running(app, attempt, reason, requeue)
        if reap is not None:
            report.reaped.append(reap)

    for task, attempt in snap.stuck:
        reason = "rollback never finished" if attempt else "in-progress without an attempt"
        if dry_run:
            report.reaped.append(Reap(task.id, attempt.id if attempt else None, reason, "ready"))
            continue
        reap = _reap_stuck(app, task, attempt, reason, report)
        if reap is not None:
            report.reaped.append(reap)

    report.orphan_windows = _orphan_windows(app, panes, snap.live)
    report.orphan_worktrees = _orphan_worktrees(settings.worktree_root, snap.worktrees)
    return report


def _verdict(
    attempt: Attempt, local: bool, panes: dict[str, Pane], now: datetime, stale: timedelta
) -> str | None:
    """Why this attempt has no live agent, or None if it may well have one."""
    if attempt.state == AttemptState.STARTING.value:
        if attempt.lease_expires_at is not None and attempt.lease_expires_at > now:
            return None
        if local and _pid_alive(attempt.dispatcher_pid):
            return None  # a slow step on this host: its dispatcher is still at work
        return "dispatcher died"
    if local:
        # tmux is the authority here; a live pane is never reaped, however old its heartbeat.
        window = _window(attempt)
        pane = panes.get(window) if window else None
        if pane is None:
            return "agent window gone"
        if pane.dead:
            return "agent pane dead without a recorded exit"
        return None
    beat = attempt.heartbeat_at or attempt.started_at
    if now - beat > stale:
        return f"heartbeat older than {int(stale.total_seconds())}s (host {attempt.host})"
    return None


def _would_be(attempt: Attempt, requeue: bool) -> str:
    if attempt.state == AttemptState.STARTING.value:
        return attempt.prior_status
    return Status.READY.value if requeue else Status.INTERRUPTED.value


def _reap_running(app: App, attempt: Attempt, reason: str, requeue: bool) -> Reap | None:
    action = Action.REQUEUE if requeue else Action.REAP

    def work(s: Session) -> Reap | None:
        if not q.move_attempt(
            s,
            attempt.id,
            expected=[AttemptState.RUNNING],
            target=AttemptState.ENDED,
            outcome=Outcome.INTERRUPTED.value,
            ended_at=utcnow(),
            error=reason,
        ):
            return None  # another sweep, or the wrapper itself, got there first
        target = next_status(Status.IN_PROGRESS, action, task_id=attempt.task_id)
        moved = q.move_task(
            s,
            attempt.task_id,
            expected=Status.IN_PROGRESS,
            target=target,
            attempt_id=attempt.id,
            fence_attempt=True,
            current_attempt_id=None,
            last_error=f"interrupted: {reason}",
        )
        if not moved:
            return None
        q.record_event(
            s,
            "reaped",
            task_id=attempt.task_id,
            attempt_id=attempt.id,
            from_status=Status.IN_PROGRESS,
            to_status=target,
            reason=reason,
        )
        return Reap(attempt.task_id, attempt.id, reason, target.value)

    return app.db.write(work)


def _reap_dispatch(
    app: App, attempt: Attempt, reason: str, local: bool, report: SweepReport
) -> Reap | None:
    """A dispatcher died mid-saga: finish its undo from the intent, then roll back."""
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
        return None
    return _finish_undo(app, attempt, reason, local, report)


def _reap_stuck(
    app: App, task: Task, attempt: Attempt | None, reason: str, report: SweepReport
) -> Reap | None:
    if attempt is not None:
        local = attempt.host == app.settings.host
        return _finish_undo(app, attempt, attempt.error or reason, local, report)

    def work(s: Session) -> Reap | None:
        target = next_status(Status.IN_PROGRESS, Action.REAP, task_id=task.id)
        if not q.move_task(
            s,
            task.id,
            expected=Status.IN_PROGRESS,
            target=target,
            fence_attempt=True,
            attempt_id=None,
            last_error=reason,
        ):
            return None
        q.record_event(
            s,
            "reaped",
            task_id=task.id,
            from_status=Status.IN_PROGRESS,
            to_status=target,
            reason=reason,
        )
        return Reap(task.id, None, reason, target.value)

    return app.db.write(work)


def _finish_undo(
    app: App, attempt: Attempt, reason: str, local: bool, report: SweepReport
) -> Reap | None:
    intent = attempt.intent or {}
    if local:
        try:
            window = intent.get("window_id")
            if window:
                app.terminal.kill_window(window)
            app.terminal.kill_windows_running(
                intent.get("session", app.settings.tmux_session), f"{WRAPPER_MARKER} {attempt.id}"
            )
            if intent.get("worktree"):
                kept = remove_created(app, intent, agent_started=attempt.agent_pid is not None)
                report.problems.extend(kept)
            prompt = prompt_path(app, attempt.id)
            prompt.unlink(missing_ok=True)
            if prompt.parent.is_dir() and not any(prompt.parent.iterdir()):
                prompt.parent.rmdir()
        except DispatchError as exc:
            report.problems.append(f"attempt {attempt.id}: undo: {exc.message}")
    status = roll_back(app, attempt.id, reason, {"step": "sweep"})
    if status is None:
        return None
    return Reap(attempt.task_id, attempt.id, reason, status.value)


def _orphan_windows(app: App, panes: list[Pane], live: list[Attempt]) -> list[str]:
    owned = {_window(a) for a in live if a.host == app.settings.host}
    session = app.settings.tmux_session
    found: list[str] = []
    for pane in panes:
        if pane.session != session or pane.window_id in owned:
            continue
        if WRAPPER_MARKER not in pane.start_command:
            continue  # the session's placeholder or a window the user opened there
        label = f"{session}:{pane.window_id} ({pane.window_name})"
        if label not in found:
            found.append(label)
    return found


def _orphan_worktrees(root: Path, known: set[str]) -> list[str]:
    root = root.expanduser()
    if not root.is_dir():
        return []
    known_paths = {str(Path(k)) for k in known}
    resolved_root = root.resolve()
    orphans = []
    for path in sorted(resolved_root.glob("*/task-*")):
        if path.is_dir() and str(path) not in known_paths:
            orphans.append(str(path))
    return orphans
