"""Commands that start, stop and watch agents: run, redispatch, cancel, done, logs, attach."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation
from dispatch.cli.tasks import NO_REAP
from dispatch.errors import EnvironmentProblem, UsageError

if TYPE_CHECKING:
    from dispatch.services.dispatching import DispatchResult

JSON = typer.Option(False, "--json", help="Print JSON.")
TASK = typer.Argument(..., help="Task id.")


def _print_result(result: DispatchResult, json: bool) -> None:
    for warning in result.warnings:
        out.notice(f"warning: {warning}")
    if json:
        out.emit_json(_result_json(result))
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
    no_reap: bool = NO_REAP,
) -> None:
    """Start a task's agent in its own worktree and tmux window.

    Claims the task, creates its worktree, writes the prompt file, opens the window and
    waits until the agent has really started; any failure undoes all of it (exit 6).
    """
    from dispatch.services.dispatching import dispatch_task, run_next

    if (task is None) == (not next_):
        raise UsageError("give a TASK id or --next, not both" if next_ else "give a TASK or --next")
    if task is not None and max_ != 1:
        raise UsageError("--max goes with --next")
    app = invocation(ctx).app()
    if task is not None:
        result = dispatch_task(app, task)
        assert result is not None
        _print_result(result, json)
        return
    run_ = run_next(app, max_, reap=not no_reap)
    if run_.failures and not run_.started:
        for failure in run_.failures[1:]:
            out.notice(f"dispatch: error: {failure.message}")
        raise run_.failures[0]  # the funnel reports it (as JSON with --json)
    if json:
        out.emit_json([_result_json(r) for r in run_.started])
    else:
        for r in run_.started:
            _print_result(r, False)
    if not run_.results:
        if run_.stopped:
            out.notice(f"nothing to dispatch: {run_.stopped}")
        elif run_.passed_over:
            out.notice(f"nothing ready to start on {app.settings.host}:")
            for reason in run_.passed_over:
                out.notice(f"  {reason}")
        else:
            out.notice("nothing ready")
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
    status: list[str] = typer.Option(
        [], "--status", help="Every open task in this status, one by one (repeatable)."
    ),
    json: bool = JSON,
) -> None:
    """Start a fresh attempt after a failure.

    For failed, incomplete, interrupted and cancelled tasks: same repo, agent and
    prompt, the same worktree and branch, and the agent's session resumed when its
    profile can. --status takes every open task in that status, one by one.
    """
    from dispatch.services.dispatching import redispatch as redispatch_service

    if sum((task is not None, attempt is not None, bool(status))) != 1:
        raise UsageError("give a TASK id, --attempt ATTEMPT or --status STATUS, exactly one")
    if status:
        _redispatch_all(ctx, status, json)
        return
    _print_result(redispatch_service(invocation(ctx).app(), task, attempt), json)


def _redispatch_all(ctx: typer.Context, statuses: list[str], json: bool) -> None:
    from dispatch.errors import DispatchError
    from dispatch.services.dispatching import DispatchResult, redispatch_each, retryable_task_ids

    app = invocation(ctx).app()
    task_ids = retryable_task_ids(app, statuses)
    outcomes: list[tuple[int, DispatchResult | DispatchError]] = []
    with out.progress(len(task_ids), "redispatching", quiet=json) as advance:
        for task_id, outcome in redispatch_each(app, task_ids):
            outcomes.append((task_id, outcome))
            advance()
    failures = [o for _, o in outcomes if isinstance(o, DispatchError)]
    if json:
        out.emit_json(
            [
                {"task_id": task_id, "error": None, **_result_json(o)}
                if isinstance(o, DispatchResult)
                else {"task_id": task_id, "error": {"code": o.exit_code, "message": o.message}}
                for task_id, o in outcomes
            ]
        )
    else:
        out.bulk_summary(
            [
                (task_id, o.task.status, f"attempt {o.attempt.number} in {o.attempt.tmux_target}")
                if isinstance(o, DispatchResult)
                else (task_id, "error", o.message)
                for task_id, o in outcomes
            ]
        )
    if failures:
        raise typer.Exit(failures[0].exit_code)


def _result_json(result: DispatchResult) -> dict[str, Any]:
    from dispatch.shapes import dispatch_result_json

    return dispatch_result_json(result)


def cancel(ctx: typer.Context, task: int = TASK, json: bool = JSON) -> None:
    """Stop a task's agent and mark it cancelled.

    Sends C-c, then kills the window after a grace period; cancelling twice is a no-op.
    An agent still running after its attempt ended (its wrapper was killed) is stopped
    too; the task then keeps its status.
    """
    from dispatch.services.control import cancel_task

    view = cancel_task(invocation(ctx).app(), task)
    for text in view.notices:
        out.notice(text)
    if json:
        out.emit_json(out.task_json(view.task))
    elif not view.notices:
        out.notice(f"task {view.task.id} is {view.task.status}")


def done(
    ctx: typer.Context,
    task: int | None = typer.Argument(
        None, help="Task id (default: DISPATCH_ATTEMPT_ID's task, else the cwd's worktree's)."
    ),
    json: bool = JSON,
) -> None:
    """Mark the running attempt's work as complete.

    Evidence for profiles with completion = "signal". Without TASK: the attempt in
    DISPATCH_ATTEMPT_ID, else the one whose worktree holds the current directory.
    """
    from dispatch.services.control import signal_done

    attempt, recorded = signal_done(invocation(ctx).app(), task)
    if json:
        out.emit_json(out.attempt_json(attempt))
    elif recorded:
        out.notice(f"attempt {attempt.id} of task {attempt.task_id} marked done")
    else:
        out.notice(f"attempt {attempt.id} of task {attempt.task_id} was already marked done")


def logs(
    ctx: typer.Context,
    task: int = TASK,
    attempt: int | None = typer.Option(None, "--attempt", help="Attempt number (default: latest)."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until it ends."),
) -> None:
    """Print an attempt's pane log, also after its window is gone."""
    import sys

    from dispatch.errors import NotFound
    from dispatch.services.control import follow_log, log_path

    app = invocation(ctx).app()
    row, path = log_path(app, task, attempt)
    if follow:
        for chunk in follow_log(app, row, path):
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
        return
    if not path.exists():
        raise NotFound(f"attempt {row.number} of task {task} has no log yet ({path})")
    sys.stdout.buffer.write(path.read_bytes())


def attach(ctx: typer.Context, task: int = TASK) -> None:
    """Switch to (inside tmux) or attach to the task's window."""
    import os
    import shlex

    from dispatch.services.control import attach_argv

    argv = attach_argv(invocation(ctx).app(), task)
    if "attach-session" in argv and not _on_a_terminal():
        # tmux would say only "open terminal failed: not a terminal", and exit 1.
        raise EnvironmentProblem(
            f"attaching to task {task}'s window needs a terminal, and stdin is not one",
            hint=f"run it from a terminal, or there: {shlex.join(argv)}",
        )
    os.execvp(argv[0], argv)


def _on_a_terminal() -> bool:
    import os

    try:
        return os.isatty(0)
    except OSError:
        return False


def agent_exec(ctx: typer.Context, attempt: int = typer.Argument(..., help="Attempt id.")) -> None:
    """Internal: the wrapper that runs inside the task's tmux window."""
    from dispatch.services.wrapper import agent_exec as run_wrapper

    raise typer.Exit(run_wrapper(invocation(ctx).app(), attempt))
