"""Entry point: global options, command registration and the one error funnel."""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NoReturn

import typer

from dispatch import __version__
from dispatch.cli.output import Mode
from dispatch.errors import DispatchError, UsageError

if TYPE_CHECKING:
    from dispatch.app import App


@dataclass
class State:
    """Global options, turned into an App on first use."""

    db: str | None = None
    config: str | None = None
    app: App | None = field(default=None, repr=False)

    def get_app(self) -> App:
        if self.app is None:
            from dispatch.app import App
            from dispatch.config import load_settings

            self.app = App(load_settings(config=self.config, db=self.db))
        return self.app


app = typer.Typer(
    name="dispatch",
    help="Run coding agents on tasks, each in its own git worktree and tmux window.",
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help: rich's help renderer (and the markdown parser it pulls in) would more
    # than double the start-up time of `dispatch --help`.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"dispatch {__version__}\n")
        raise typer.Exit()


@app.callback(invoke_without_command=True)
def _global(
    ctx: typer.Context,
    db: str | None = typer.Option(
        None, "--db", metavar="URL_OR_PATH", help="Database URL or SQLite file (env DISPATCH_DB)."
    ),
    config: str | None = typer.Option(
        None, "--config", metavar="PATH", help="Config file (env DISPATCH_CONFIG)."
    ),
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    global _current
    ctx.obj = _current = State(db=db, config=config)
    if ctx.invoked_subcommand is None:  # no command: the usage says it all, as a usage error
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(2)


_current: State | None = None


def _register() -> None:
    from dispatch.cli import db, dispatching, sweep, tasks

    for module in (tasks, dispatching, sweep, db):
        module.register(app)


_register()


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def main() -> NoReturn:
    """The console script: run, flush, and exit without interpreter teardown."""
    code = run(sys.argv[1:])
    _flush()
    # Interpreter teardown of SQLAlchemy & co. costs ~150 ms: skip it, output is flushed.
    os._exit(code)


def run(args: list[str]) -> int:
    """Run the CLI; every error leaves through here as one line and its exit code."""
    global _current
    _current = None
    Mode.json = "--json" in args
    code = 0
    try:
        result = app(args=args, prog_name="dispatch", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except typer.Exit as exc:
        code = exc.exit_code
    except typer.Abort:
        _report(UsageError("aborted"))
        code = 130
    except typer.TyperException as exc:  # bad usage: unknown option, malformed id, ...
        _report(UsageError(exc.format_message(), hint=_help_hint(exc)))
        code = 2
    except DispatchError as exc:
        _report(exc)
        code = exc.exit_code
    except KeyboardInterrupt:
        _report(DispatchError("interrupted"))
        code = 130
    except BrokenPipeError:
        code = 0
    except Exception as exc:  # the funnel: no traceback unless asked for
        _report(DispatchError(f"{type(exc).__name__}: {exc}"))
        code = 1
    finally:
        if _current is not None and _current.app is not None:
            _current.app.close()
    return code


def _help_hint(exc: Exception) -> str | None:
    ctx = getattr(exc, "ctx", None)
    return f"see `{ctx.command_path} --help`" if ctx is not None else None


def _report(exc: DispatchError) -> None:
    if os.environ.get("DISPATCH_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    from dispatch.cli.output import error

    error(exc)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
