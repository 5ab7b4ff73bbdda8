"""Commands over tasks: add, list, show, events, reset, close, reopen."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.errors import UsageError

if TYPE_CHECKING:
    from dispatch.store.pages import EventLine

JSON = typer.Option(False, "--json", help="Print JSON.")
TABLE_OR_JSON = typer.Option(False, "--json", help="Print JSON instead of a table.")
TASK = typer.Argument(..., help="Task id.")
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


# How many rows a table shows unless told (JSON shows everything unless told).
LIST_LIMIT = 100
EVENTS_LIMIT = 200
SHOW_EVENTS = 50


def _limit(value: int | None, default: int | None) -> int | None:
    """The option as the services take it: None for all."""
    if value is None:
        value = default
    return None if value == 0 else value


def list_(
    ctx: typer.Context,
    status: list[str] = typer.Option([], "--status", help="Only tasks in this status (repeat)."),
    all_: bool = typer.Option(False, "--all", help="Include closed tasks."),
    repo: Path | None = typer.Option(None, "--repo", help="Only tasks of this repository."),
    agent: str | None = typer.Option(None, "--agent", help="Only tasks of this agent profile."),
    host: str | None = typer.Option(
        None, "--host", help="Only tasks whose latest attempt ran on this host."
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=0,
        help=f"At most N tasks (table: {LIST_LIMIT} unless given; JSON: all); 0: all.",
    ),
    json: bool = TABLE_OR_JSON,
    no_reap: bool = NO_REAP,
) -> None:
    """List tasks (closed ones only with --all), highest priority first."""
    from dispatch.services.tasks import stream_task_list, task_query

    where = None if repo is None else str(repo.expanduser().resolve())
    query = task_query(status, all_, repo=where, agent=agent, host=host)
    app = invocation(ctx).app()
    if json:
        array = out.JsonArray()
        stream_task_list(
            app,
            lambda t: array.add_object({**out.task_json(t), "host": t.host}),
            query,
            limit=_limit(limit, None),
            reap=not no_reap,
        )
        array.close()
        return
    table = out.StreamedTable(out.TASK_HEADERS, status_column=1, shrinks=out.TITLE_COLUMN)
    page = stream_task_list(
        app,
        lambda t: table.add(out.task_cells(t), out.task_style(t)),
        query,
        limit=_limit(limit, LIST_LIMIT),
        reap=not no_reap,
    )
    table.flush()
    if not page.shown:
        out.notice("no tasks")
    out.more_line(page.more, "more tasks match", "--limit")


def show(
    ctx: typer.Context,
    task: int = typer.Argument(..., help="Task id."),
    events: int | None = typer.Option(
        None, "--events", min=0, help=f"Show the newest N events (default {SHOW_EVENTS}); 0: all."
    ),
    json: bool = TABLE_OR_JSON,
    no_reap: bool = NO_REAP,
) -> None:
    """Show a task, its attempts and its event timeline."""
    from dispatch.services.tasks import show_task
    from dispatch.shapes import task_detail_json

    view = show_task(
        invocation(ctx).app(), task, reap=not no_reap, events=_limit(events, SHOW_EVENTS)
    )
    if json:
        out.emit_json(task_detail_json(view))
    else:
        out.task_detail(view.task, view.attempts, view.events)
    out.more_line(view.events_more, "earlier events not shown", "--events")
    for text in view.notices:
        out.notice(text)


def events(
    ctx: typer.Context,
    task: int | None = typer.Option(None, "--task", help="Only this task's events."),
    after: int | None = typer.Option(
        None, "--after", min=0, help="Only events after this event id."
    ),
    since: str | None = typer.Option(
        None, "--since", help="Only events since a duration ago (10m, 2d) or a time (ISO, UTC)."
    ),
    limit: int | None = typer.Option(
        None,
        "--limit",
        min=0,
        help=f"Only the newest N (table: {EVENTS_LIMIT} unless given; JSON: all); 0: all.",
    ),
    follow: bool = typer.Option(
        False, "--follow", "-f", help="Keep printing new events as they come, until Ctrl-C."
    ),
    json: bool = TABLE_OR_JSON,
) -> None:
    """The audit log of every state change, oldest first.

    With --follow and --json, one JSON object per line (JSON Lines), since the array
    would never end.
    """
    from dispatch.services.tasks import event_query, follow_event_log, stream_event_log

    app = invocation(ctx).app()
    query = event_query(task, after, since)
    if json and follow:

        def lines(batch: Sequence[EventLine]) -> None:
            out.line("\n".join(out.event_json_lines(batch)))

        _, last = stream_event_log(app, lines, query, limit=_limit(limit, None))
        _follow(lambda: follow_event_log(app, lines, query, last))
        return
    if json:
        array = out.JsonArray()
        stream_event_log(
            app,
            lambda batch: array.extend(out.event_json_lines(batch)),
            query,
            limit=_limit(limit, None),
        )
        array.close()
        return
    table = out.StreamedTable(out.EVENT_HEADERS)

    def rows(batch: Sequence[EventLine]) -> None:
        for e in batch:
            table.add(out.event_cells(e))

    page, last = stream_event_log(app, rows, query, limit=_limit(limit, EVENTS_LIMIT))
    table.flush()
    out.more_line(page.more, "earlier events not shown", "--limit")
    if follow:
        _follow(lambda: follow_event_log(app, rows, query, last, flush=table.flush))
    elif not page.shown:
        out.notice("no events")


def _follow(loop: Callable[[], None]) -> None:
    """Run a follow loop until Ctrl-C, which is how it is meant to end: exit 0."""
    with contextlib.suppress(KeyboardInterrupt):
        loop()


def reset(ctx: typer.Context, task: int = TASK, json: bool = JSON) -> None:
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


def close(ctx: typer.Context, task: int = TASK, json: bool = JSON) -> None:
    """Archive a task; a running attempt is cancelled with it."""
    from dispatch.services.control import close_task

    view = close_task(invocation(ctx).app(), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} closed ({view.task.status})")


def reopen(ctx: typer.Context, task: int = TASK, json: bool = JSON) -> None:
    """Unarchive a task; it keeps its status."""
    from dispatch.services.tasks import reopen_task

    view = reopen_task(invocation(ctx).app(), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} reopened ({view.task.status})")
