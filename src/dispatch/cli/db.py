"""`dispatch db upgrade|current` and `dispatch doctor`."""

from __future__ import annotations

import typer

from dispatch.cli import output as out
from dispatch.cli.context import invocation

db_app = typer.Typer(help="Database migrations.", rich_markup_mode=None)


@db_app.callback(invoke_without_command=True)
def _db(ctx: typer.Context) -> None:
    if ctx.invoked_subcommand is None:  # `dispatch db` alone: show what it offers
        out.line(ctx.get_help())
        raise typer.Exit(2)


@db_app.command("upgrade")
def upgrade(ctx: typer.Context) -> None:
    """Apply pending migrations (also done automatically on first use)."""
    db = invocation(ctx).app().db
    before = db.current_revision()
    after = db.upgrade()
    out.line(f"{before or 'empty'} -> {after}" if before != after else f"already at {after}")


@db_app.command("current")
def current(ctx: typer.Context) -> None:
    """Print the database's schema revision."""
    from dispatch.store.revisions import HEAD_REVISION, KNOWN_REVISIONS

    revision = invocation(ctx).app().db.current_revision()
    if revision == HEAD_REVISION:
        suffix = " (head)"
    elif revision is None or revision in KNOWN_REVISIONS:
        suffix = f" (head is {HEAD_REVISION}; `dispatch db upgrade` applies the rest)"
    else:
        suffix = f" (newer than this dispatch, whose head is {HEAD_REVISION})"
    out.line((revision or "empty") + suffix)


def doctor(ctx: typer.Context, json: bool = typer.Option(False, "--json")) -> None:
    """Check that everything dispatch needs works.

    tmux, git, the database server, the database and its migrations, that no other
    live host uses this host's name, the config and the agent commands; exit 0 only if
    every check passes.
    """
    from dispatch.app import App
    from dispatch.config import load_settings
    from dispatch.services.doctor import run_checks

    options = invocation(ctx)
    checks = run_checks(options.app, lambda: App(load_settings(db=options.db, read_file=False)))
    if json:
        out.emit_json([{"name": c.name, "detail": c.detail, "ok": c.ok} for c in checks])
    else:
        out.key_values("dispatch doctor", [(c.name, c.detail, c.ok) for c in checks])
    if not all(c.ok for c in checks):
        raise typer.Exit(7)
