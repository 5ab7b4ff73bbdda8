"""`dispatch sweep`: no task stays in-progress without a live agent (SPEC §4).

One tmux listing and a constant number of queries decide; each reap is one
conditional write with one event, so concurrent sweeps reap a task once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dispatch.adapters.processes import process_alive
from dispatch.app import App
from dispatch.lifecycle import Action, AttemptState, Status, next_status
from dispatch.services.panes import Panes, attempt_of, window_of
from dispatch.services.reaping import Reap, reap_dispatch, reap_running, reap_stuck
from dispatch.store.statements import AttemptCheck, census, live_here

_TASK_DIR = re.compile(r"task-(\d+)")


@dataclass
class SweepReport:
    checked: int = 0
    reaped: list[Reap] = field(default_factory=list)
    orphan_windows: list[str] = field(default_factory=list)
    orphan_worktrees: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


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


def _orphan_dirs(dirs: list[tuple[Path, int | None]], repos: dict[int, str]) -> list[str]:
    """Task directories that belong to no task (one belongs to the task whose id and
    repository name it bears)."""
    return [
        str(path)
        for path, n in dirs
        if n is None or n not in repos or Path(repos[n]).name != path.parent.name
    ]


def sweep(
    app: App, *, dry_run: bool = False, requeue: bool = False, stale_after: float | None = None
) -> SweepReport:
    """Reap what has no live agent; report orphans; change nothing with `dry_run`."""
    settings = app.settings
    stale = timedelta(seconds=settings.stale_after if stale_after is None else stale_after)
    dirs = _task_dirs(settings.worktree_root)
    # The census comes before the listing: a window an attempt had when it was read
    # must show in the listing unless it has really gone since.
    task_ids = sorted({n for _, n in dirs if n is not None})
    snap = app.direct.read(lambda tx: census(tx, task_ids))
    panes = Panes.of(app.terminal.list_panes())
    now = datetime.now(UTC)
    report = SweepReport(checked=len(snap.live) + len(snap.stuck))

    for attempt in snap.live:
        reason = _verdict(app, attempt, panes, now, stale)
        if reason is None:
            continue
        if dry_run:
            status = _would_be(app, attempt, requeue)
            report.reaped.append(Reap(attempt.task_id, attempt.id, reason, status))
            continue
        if attempt.state == AttemptState.STARTING.value:
            reap, problems = reap_dispatch(app, attempt, reason, panes)
            report.problems += problems
        else:
            reap = reap_running(app, attempt, reason, requeue)
        if reap is not None:
            report.reaped.append(reap)

    for stuck in snap.stuck:
        ended = stuck.attempt
        if ended is not None and _rollback_under_way(app, ended, now):
            continue
        reason = "rollback never finished" if ended else "in-progress without an attempt"
        if dry_run:
            status = _rollback_status(app, ended) if ended else Status.INTERRUPTED.value
            report.reaped.append(Reap(stuck.id, ended.id if ended else None, reason, status))
            continue
        reap, problems = reap_stuck(app, stuck.id, ended, reason, panes)
        report.problems += problems
        if reap is not None:
            report.reaped.append(reap)

    report.orphan_windows = _orphan_windows(app, panes, snap.live)
    report.orphan_worktrees = _orphan_dirs(dirs, snap.repos)
    return report


def reconcile(app: App) -> list[Reap]:
    """Apply the sweep's verdict to this host's live attempts, so that a read is true when
    it is made: one indexed query, and one tmux listing only when there is any."""
    if app.settings.no_reap:
        return []
    live = app.direct.read(lambda tx: live_here(tx, app.settings.host))
    if not live:
        return []
    panes = Panes.of(app.terminal.list_panes())
    now = datetime.now(UTC)
    stale = timedelta(seconds=app.settings.stale_after)
    reaped: list[Reap] = []
    for attempt in live:
        reason = _verdict(app, attempt, panes, now, stale)
        if reason is None:
            continue
        if attempt.state == AttemptState.STARTING.value:
            # What its undo could not clean up stays for `dispatch sweep` to report.
            reap, _ = reap_dispatch(app, attempt, reason, panes)
        else:
            reap = reap_running(app, attempt, reason, False)
        if reap is not None:
            reaped.append(reap)
    return reaped


def _judged_by_tmux(app: App, attempt: AttemptCheck) -> bool:
    """Whether this sweep's tmux listing can tell if the attempt's agent is alive."""
    if attempt.host != app.settings.host:
        return False
    # An attempt started on another tmux server (the socket setting changed) is not in
    # our listing: its absence there proves nothing, so it is judged by heartbeat.
    return (attempt.tmux_socket or "") == (app.settings.tmux_socket or "")


def _verdict(
    app: App, attempt: AttemptCheck, panes: Panes, now: datetime, stale: timedelta
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


def _rollback_under_way(app: App, attempt: AttemptCheck, now: datetime) -> bool:
    """Whether someone alive may still be rolling this attempt back (never reap it then)."""
    if attempt.lease_expires_at is not None and attempt.lease_expires_at > now:
        return True
    local = attempt.host == app.settings.host
    return local and process_alive(attempt.dispatcher_pid, attempt.started_at)


def _rollback_status(app: App, attempt: AttemptCheck) -> str:
    """The status a rollback of this attempt leaves (the failure cap included)."""
    return next_status(
        Status.IN_PROGRESS,
        Action.ROLLBACK,
        prior=Status(attempt.prior_status),
        failures=attempt.task_failures + 1,
        max_failures=app.settings.max_dispatch_failures,
        task_id=attempt.task_id,
    ).value


def _would_be(app: App, attempt: AttemptCheck, requeue: bool) -> str:
    if attempt.state == AttemptState.STARTING.value:
        return _rollback_status(app, attempt)
    if attempt.cancel_requested_at is not None:
        return Status.CANCELLED.value
    return Status.READY.value if requeue else Status.INTERRUPTED.value


def _orphan_windows(app: App, panes: Panes, live: list[AttemptCheck]) -> list[str]:
    """Windows running a dispatch wrapper whose attempt is no longer live; never killed."""
    owned = {a.id for a in live}
    owned_windows = {window_of(a) for a in live if _judged_by_tmux(app, a)}
    found: list[str] = []
    for pane in panes.all:
        attempt_id = attempt_of(pane)
        if attempt_id is None:
            continue  # the user's own windows, or a shell they opened in the session
        if attempt_id in owned or pane.window_id in owned_windows:
            continue
        label = f"{pane.session}:{pane.window_id} ({pane.window_name})"
        if label not in found:
            found.append(label)
    return found
