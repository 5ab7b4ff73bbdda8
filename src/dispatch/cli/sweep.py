"""`dispatch sweep`: reap in-progress tasks whose agent is gone (SPEC §4)."""

from __future__ import annotations

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.errors import UsageError


def sweep(
    ctx: typer.Context,
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would be reaped."),
    requeue: bool = typer.Option(False, "--requeue", help="Reaped tasks go back to ready."),
    stale_after: str | None = typer.Option(
        None, "--stale-after", metavar="DURATION", help="Other hosts' heartbeat age (e.g. 10m)."
    ),
    json: bool = typer.Option(False, "--json", help="Print JSON."),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Print nothing when nothing is reaped."
    ),
) -> None:
    """Reap tasks left in-progress without a live agent.

    Safe from cron and alongside dispatches. Also reports, without deleting, windows
    and worktrees that no task owns.
    """
    from dispatch.config import parse_duration
    from dispatch.services.sweep import sweep as sweep_service
    from dispatch.shapes import sweep_json

    app = invocation(ctx).app()
    try:
        stale = parse_duration(stale_after) if stale_after else app.settings.stale_after
    except ValueError as exc:
        raise UsageError(f"--stale-after: {exc}") from None
    report = sweep_service(app, dry_run=dry_run, requeue=requeue, stale_after=stale)
    # Undo problems go to stderr whatever the options: they need a person's attention.
    for problem in report.problems:
        out.notice(f"dispatch: warning: {problem}")
    if quiet and not report.reaped:
        return
    if json:
        out.emit_json(sweep_json(report))
        return
    verb = "would reap" if dry_run else "reaped"
    for r in report.reaped:
        out.line(f"{verb} task {r.task_id} (attempt {r.attempt_id}): {r.reason} -> {r.status}")
    for w in report.orphan_windows:
        out.line(f"orphan window {w} (no running attempt; not killed)")
    for p in report.orphan_worktrees:
        out.line(f"orphan worktree {p} (no task; not removed)")
    if not quiet:
        out.notice(f"checked {report.checked} attempt(s), {verb} {len(report.reaped)}")
