"""Commands over tasks: add, list, show, events, reset, close, reopen."""

from __future__ import annotations

from pathlib import Path

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.errors import UsageError

JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
NO_REAP = typer.Option(
    False,
    "--no-reap",
    help="Only read: do not first reap this host's dead agents (env DISPATCH_NO_REAP=1).",
)


def add(
    ctx: typer.Context,
    title: str = typer.Argument(..., help="What the task is about; also the branch slug."),
    prompt: str | None = typer.Option(None, "--prompt", help="Text given to the agent."),
    prompt_file: Path | None = typer.Option(
        None, "--prompt-file", help="Read the prompt from a file ('-' for stdin)."
    ),
    repo: Path | None = typer.Option(None, "--repo", help="Git repository (default: the cwd's)."),
    agent: str | None = typer.Option(None, "--agent", help="Agent profile name."),
    base: str | None = typer.Option(None, "--base", help="Base ref (default: the repo's HEAD)."),
    priority: int = typer.Option(0, "--priority", help="Higher runs first."),
    json: bool = JSON,
) -> None:
    """Create a ready task and print its id."""
    from dispatch.services.tasks import add_task

    if prompt is not None and prompt_file is not None:
        raise UsageError("give --prompt or --prompt-file, not both")
    if prompt_file is not None:
        prompt = _read_prompt(prompt_file)
    task = add_task(
        invocation(ctx).app(),
        title,
        prompt=prompt,
        repo=repo,
        agent=agent,
        base=base,
        priority=priority,
    )
    if json:
        out.emit_json(out.task_json(task))
    else:
        out.line(str(task.id))


def _read_prompt(path: Path) -> str:
    import sys

    try:
        if str(path) == "-":
            return sys.stdin.read()
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read prompt file {path}: {exc}") from None


def list_(
    ctx: typer.Context,
    status: list[str] = typer.Option([], "--status", help="Only tasks in this status (repeat)."),
    all_: bool = typer.Option(False, "--all", help="Include closed tasks."),
    json: bool = JSON,
    no_reap: bool = NO_REAP,
) -> None:
    """List tasks (closed ones only with --all)."""
    from dispatch.services.tasks import list_tasks

    tasks = list_tasks(invocation(ctx).app(), status, include_closed=all_, reap=not no_reap)
    if json:
        out.emit_json([{**out.task_json(t), "host": t.host} for t in tasks])
    else:
        out.task_table(tasks)


def show(
    ctx: typer.Context,
    task: int = typer.Argument(..., help="Task id."),
    json: bool = JSON,
    no_reap: bool = NO_REAP,
) -> None:
    """Show a task, its attempts and its event timeline."""
    from dispatch.services.tasks import show_task
    from dispatch.shapes import task_detail_json

    view = show_task(invocation(ctx).app(), task, reap=not no_reap)
    if json:
        out.emit_json(task_detail_json(view))
    else:
        out.task_detail(view.task, view.attempts, view.events)


def events(
    ctx: typer.Context,
    task: int | None = typer.Option(None, "--task", help="Only this task's events."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Only the newest N."),
    json: bool = JSON,
) -> None:
    """The audit log of every state change."""
    from dispatch.services.tasks import list_events

    rows = list_events(invocation(ctx).app(), task, limit)
    if json:
        out.emit_json([out.event_json(e) for e in rows])
    else:
        out.event_table(rows)


def reset(ctx: typer.Context, task: int = typer.Argument(...), json: bool = JSON) -> None:
    """Put a finished, unsuccessful task back to ready.

    Works on failed, incomplete, interrupted and cancelled tasks; clears the count of
    consecutive failed dispatches.
    """
    from dispatch.services.tasks import reset_task

    row = reset_task(invocation(ctx).app(), task)
    if json:
        out.emit_json(out.task_json(row))
    else:
        out.notice(f"task {row.id} is {row.status}")


def close(ctx: typer.Context, task: int = typer.Argument(...), json: bool = JSON) -> None:
    """Archive a task; a running attempt is cancelled with it."""
    from dispatch.services.control import close_task

    view = close_task(invocation(ctx).app(), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} closed ({view.task.status})")


def reopen(ctx: typer.Context, task: int = typer.Argument(...), json: bool = JSON) -> None:
    """Unarchive a task; it keeps its status."""
    from dispatch.services.tasks import reopen_task

    view = reopen_task(invocation(ctx).app(), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} reopened ({view.task.status})")
