"""Commands that start, stop and watch agents: run, redispatch, cancel, done, logs, attach."""

from __future__ import annotations

import typer

from dispatch.cli import output as out
from dispatch.errors import UsageError

JSON = typer.Option(False, "--json", help="Print JSON.")


def register(app: typer.Typer) -> None:
    app.command("run")(run)
    app.command("redispatch")(redispatch)
    app.command("cancel")(cancel)
    app.command("done")(done)
    app.command("logs")(logs)
    app.command("attach")(attach)
    app.command("agent-exec", hidden=True)(agent_exec)


def _app(ctx: typer.Context):  # type: ignore[no-untyped-def]
    from dispatch.cli.main import state

    return state(ctx).get_app()


def _print_result(result, json: bool) -> None:  # type: ignore[no-untyped-def]
    for warning in result.warnings:
        out.notice(f"warning: {warning}")
    if json:
        data = {"task": out.task_json(result.task), "attempt": out.attempt_json(result.attempt)}
        if result.warnings:
            data["warnings"] = result.warnings
        out.emit_json(data)
    else:
        a = result.attempt
        out.notice(
            f"task {result.task.id} {result.task.status}: attempt {a.number} (id {a.id}) "
            f"in {a.tmux_target}, worktree {a.worktree}"
        )


def run(
    ctx: typer.Context,
    task: int | None = typer.Argument(None, help="Task id."),
    next_: bool = typer.Option(False, "--next", help="The highest-priority ready task(s)."),
    max_: int = typer.Option(1, "--max", min=1, help="With --next: dispatch up to N tasks."),
    json: bool = JSON,
) -> None:
    """Dispatch a task: claim it, make its worktree, start its agent in tmux."""
    from dispatch.services.dispatching import dispatch_task, run_next

    if (task is None) == (not next_):
        raise UsageError("give a TASK id or --next, not both" if next_ else "give a TASK or --next")
    if task is not None and max_ != 1:
        raise UsageError("--max goes with --next")
    app = _app(ctx)
    if task is not None:
        result = dispatch_task(app, task)
        assert result is not None
        _print_result(result, json)
        return
    run_ = run_next(app, max_)
    if run_.failures and not run_.started:
        for failure in run_.failures[1:]:
            out.notice(f"dispatch: error: {failure.message}")
        raise run_.failures[0]  # the funnel reports it (as JSON with --json)
    if json:
        out.emit_json(
            [
                {"task": out.task_json(r.task), "attempt": out.attempt_json(r.attempt)}
                for r in run_.started
            ]
        )
    else:
        for r in run_.started:
            _print_result(r, False)
    if not run_.results:
        out.notice(f"nothing to dispatch: {run_.stopped}" if run_.stopped else "nothing ready")
    elif run_.stopped:
        out.notice(f"stopped: {run_.stopped}")
    for failure in run_.failures:
        out.notice(f"dispatch: error: {failure.message}")
    if run_.failures:
        raise typer.Exit(run_.failures[0].exit_code)


def redispatch(
    ctx: typer.Context,
    task: int | None = typer.Argument(None, help="Task id."),
    attempt: int | None = typer.Option(None, "--attempt", help="Redispatch after this attempt."),
    json: bool = JSON,
) -> None:
    """Start a fresh attempt of a failed, incomplete, interrupted or cancelled task."""
    from dispatch.services.dispatching import redispatch as redispatch_service

    if (task is None) == (attempt is None):
        raise UsageError("give a TASK id or --attempt ATTEMPT, exactly one")
    _print_result(redispatch_service(_app(ctx), task, attempt), json)


def cancel(ctx: typer.Context, task: int = typer.Argument(...), json: bool = JSON) -> None:
    """Stop the task's agent (C-c, then kill after a grace); idempotent."""
    from dispatch.services.control import cancel_task

    view = cancel_task(_app(ctx), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} is {view.task.status}")


def done(ctx: typer.Context, task: int | None = typer.Argument(None), json: bool = JSON) -> None:
    """Signal that the agent's work is complete (for completion = "signal")."""
    from dispatch.services.control import signal_done

    attempt = signal_done(_app(ctx), task)
    if json:
        out.emit_json(out.attempt_json(attempt))
    else:
        out.notice(f"attempt {attempt.id} of task {attempt.task_id} marked done")


def logs(
    ctx: typer.Context,
    task: int = typer.Argument(...),
    attempt: int | None = typer.Option(None, "--attempt", help="Attempt number (default: latest)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """Print an attempt's pane log, also after its window is gone."""
    import sys

    from dispatch.errors import NotFound
    from dispatch.services.control import follow_log, log_path

    app = _app(ctx)
    row, path = log_path(app, task, attempt)
    if follow:
        for chunk in follow_log(app, row, path):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return
    if not path.exists():
        raise NotFound(f"attempt {row.number} of task {task} has no log yet ({path})")
    sys.stdout.buffer.write(path.read_bytes())


def attach(ctx: typer.Context, task: int = typer.Argument(...)) -> None:
    """Switch to (inside tmux) or attach to the task's window."""
    import os

    from dispatch.services.control import attach_argv

    argv = attach_argv(_app(ctx), task)
    os.execvp(argv[0], argv)


def agent_exec(ctx: typer.Context, attempt: int = typer.Argument(...)) -> None:
    """Internal: the wrapper that runs inside the task's tmux window."""
    from dispatch.services.wrapper import agent_exec as run_wrapper

    raise typer.Exit(run_wrapper(_app(ctx), attempt))
