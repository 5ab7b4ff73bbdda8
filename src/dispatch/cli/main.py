"""Entry point: global options, command registration and the one error funnel."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

import typer

from dispatch import __version__
from dispatch.cli.context import Invocation, invocation
from dispatch.cli.funnel import funnel, python_interrupts
from dispatch.errors import DispatchError, UsageError

if TYPE_CHECKING:
    pass


_SETTINGS = dict(
    name="dispatch",
    help="Run coding agents on tasks, each in its own git worktree and tmux window.",
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
    invocation(ctx).db, invocation(ctx).config = db, config
    if ctx.invoked_subcommand is None:  # no command: the usage says it all, as a usage error
        sys.stdout.write(ctx.get_help() + "\n")
        raise typer.Exit(2)


# Command name -> (module, function), in help order. Only the command being run is
# registered: typer builds every registered command's parameters on each start.
COMMANDS: dict[str, tuple[str, str]] = {
    "add": ("tasks", "add"),
    "list": ("tasks", "list_"),
    "show": ("tasks", "show"),
    "events": ("tasks", "events"),
    "reset": ("tasks", "reset"),
    "close": ("tasks", "close"),
    "reopen": ("tasks", "reopen"),
    "run": ("dispatching", "run"),
    "redispatch": ("dispatching", "redispatch"),
    "cancel": ("dispatching", "cancel"),
    "done": ("dispatching", "done"),
    "logs": ("dispatching", "logs"),
    "attach": ("dispatching", "attach"),
    "sweep": ("sweep", "sweep"),
    "serve": ("serve", "serve"),
    "gc": ("gc", "gc"),
    "restore": ("gc", "restore"),
    "doctor": ("db", "doctor"),
    "db": ("db", "db_app"),
    "agent-exec": ("dispatching", "agent_exec"),
}
HIDDEN = {"agent-exec"}
# How the shell asks `dispatch` for completions (click's `_<PROG>_COMPLETE`).
COMPLETE_VAR = "_DISPATCH_COMPLETE"
_COMPLETION_OPTIONS = {"--install-completion", "--show-completion"}
# What typer returns, without a word, when a Ctrl-C interrupted the command.
TYPER_INTERRUPTED = 130
_GLOBAL_WITH_VALUE = {"--db", "--config"}


def _command_of(args: list[str]) -> str | None:
    """The command word of an argv, skipping global options and their values."""
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _GLOBAL_WITH_VALUE:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def build(command: str | None = None, *, completing: bool = False) -> typer.Typer:
    """The CLI with just `command` when it is known, else with every command (help, typos).

    Shell completion (`--install-completion`, `--show-completion`, and the shell asking
    through `_DISPATCH_COMPLETE`) gets the whole CLI with every command's parameters;
    everything else is spared the cost of typer's completion machinery."""
    import importlib

    add_completion = completing or command not in COMMANDS
    cli = typer.Typer(**{**_SETTINGS, "add_completion": add_completion})  # type: ignore[arg-type]
    cli.callback(invoke_without_command=True)(_global)
    if completing and COMPLETE_VAR in os.environ:
        for name, (module, attribute) in COMMANDS.items():
            _register(
                cli, name, getattr(importlib.import_module(f"dispatch.cli.{module}"), attribute)
            )
        return cli
    if command in COMMANDS:
        module, attribute = COMMANDS[command]
        _register(
            cli, command, getattr(importlib.import_module(f"dispatch.cli.{module}"), attribute)
        )
        return cli
    # No command, or an unknown one: only the list of commands is shown, so each is a
    # stand-in with its help and no parameters (typer would build every parameter).
    for name, (module, attribute) in COMMANDS.items():
        target = getattr(importlib.import_module(f"dispatch.cli.{module}"), attribute)
        summary = target.info.help if isinstance(target, typer.Typer) else target.__doc__
        cli.command(name, help=summary, hidden=name in HIDDEN)(_stand_in)
    return cli


def _register(cli: typer.Typer, name: str, target: Any) -> None:
    if isinstance(target, typer.Typer):
        cli.add_typer(target, name=name)
    else:
        cli.command(name, hidden=name in HIDDEN)(target)


def _stand_in() -> None:
    """Never run: a command is registered for real when it is the one invoked."""


def run(args: list[str]) -> int:
    """Parse and run one command; errors leave through the funnel as one line and a code."""
    # Known before parsing, so that a usage error is JSON too when JSON was asked for.
    this = Invocation(json="--json" in args)

    def work() -> int:
        completing = COMPLETE_VAR in os.environ or bool(_COMPLETION_OPTIONS & set(args))
        cli = build(_command_of(args), completing=completing)
        python_interrupts()
        try:
            result = cli(args=args, prog_name="dispatch", standalone_mode=False, obj=this)
        except typer.Exit as exc:
            return exc.exit_code
        except typer.Abort:
            raise DispatchError("aborted") from None
        except typer.TyperException as exc:  # bad usage: unknown option, malformed id, ...
            raise UsageError(exc.format_message(), hint=_help_hint(exc)) from None
        if result == TYPER_INTERRUPTED:
            # typer turns a Ctrl-C into a silent exit 130 (no command returns 130): the
            # funnel says it, as for a Ctrl-C anywhere else.
            raise KeyboardInterrupt
        return result if isinstance(result, int) else 0

    try:
        return funnel(work, json=this.json)
    finally:
        this.close()


def _help_hint(exc: Exception) -> str | None:
    ctx = getattr(exc, "ctx", None)
    return f"see `{ctx.command_path} --help`" if ctx is not None else None
