"""`dispatch gc` and `dispatch restore`: reclaim worktrees, never losing work (SPEC §9)."""

from __future__ import annotations

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.errors import UsageError

# More worktrees than this and a person sees a progress bar (on a terminal only).
_BAR_FROM = 5


def gc(
    ctx: typer.Context,
    older_than: str | None = typer.Option(
        None,
        "--older-than",
        metavar="DURATION",
        help="Only tasks unchanged for this long (default: gc_after, 7d).",
    ),
    include_failed: bool = typer.Option(
        False,
        "--include-failed",
        help="Also failed, incomplete, interrupted and cancelled tasks.",
    ),
    branches: bool = typer.Option(
        False, "--branches", help="Also delete their branches, when merged into the base."
    ),
    orphans: bool = typer.Option(
        False, "--orphans", help="Also worktrees under worktree_root that no task owns."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="Report what would go; change nothing."),
    json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Reclaim finished tasks' worktrees, saving their work first.

    Done and closed tasks (with --include-failed, failed ones too) unchanged for
    --older-than. Anything uncommitted is saved first as a commit at
    refs/dispatch/wip/TASK-ATTEMPT; `dispatch restore TASK` brings it back. Kept, with
    the reason: a worktree an agent's processes still run in, and one whose detached
    HEAD holds commits no branch does. Another host's worktrees are that host's to collect.
    """
    from dispatch.config import parse_duration
    from dispatch.services.gc import GcOptions, collect

    app = invocation(ctx).app()
    try:
        age = parse_duration(older_than) if older_than else app.settings.gc_after
    except ValueError as exc:
        raise UsageError(f"--older-than: {exc}") from None
    options = GcOptions(age, include_failed, branches, orphans, dry_run)
    report = collect(
        app,
        options,
        progress=lambda n: out.progress(n, "collecting worktrees", quiet=json or n <= _BAR_FROM),
    )
    for problem in report.problems:
        out.notice(f"dispatch: warning: {problem}")
    if json:
        out.emit_json(out.gc_json(report))
    else:
        out.gc_table(report)


def restore(
    ctx: typer.Context,
    task: int = typer.Argument(..., help="Task id."),
    json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Bring back a collected worktree, uncommitted work too."""
    from dispatch.services.restore import restore as restore_service

    result = restore_service(invocation(ctx).app(), task)
    if json:
        out.emit_json(out.restored_json(result))
    else:
        out.restored_line(result)
