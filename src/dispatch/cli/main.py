"""Entry point: global options, command registration and the one error funnel."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import typer

from dispatch import __version__
from dispatch.cli.entry import funnel, python_interrupts
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


_SETTINGS = dict(
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
_HIDDEN = {"agent-exec"}
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


def build(command: str | None = None) -> typer.Typer:
    """The CLI with just `command` when it is known, else with every command (help, typos)."""
    import importlib

    cli = typer.Typer(**_SETTINGS)  # type: ignore[arg-type]
    cli.callback(invoke_without_command=True)(_global)
    if command in COMMANDS:
        module, attribute = COMMANDS[command]
        target = getattr(importlib.import_module(f"dispatch.cli.{module}"), attribute)
        if isinstance(target, typer.Typer):
            cli.add_typer(target, name=command)
        else:
            cli.command(command, hidden=command in _HIDDEN)(target)
        return cli
    # No command, or an unknown one: only the list of commands is shown, so each is a
    # stand-in with its help and no parameters (typer would build every parameter).
    for name, (module, attribute) in COMMANDS.items():
        target = getattr(importlib.import_module(f"dispatch.cli.{module}"), attribute)
        summary = target.info.help if isinstance(target, typer.Typer) else target.__doc__
        cli.command(name, help=summary, hidden=name in _HIDDEN)(_stand_in)
    return cli


def _stand_in() -> None:
    """Never run: a command is registered for real when it is the one invoked."""


def state(ctx: typer.Context) -> State:
    root = ctx.find_root()
    if not isinstance(root.obj, State):
        root.obj = State()
    return root.obj


def run(args: list[str]) -> int:
    """Parse and run one command; errors leave through the funnel as one line and a code."""
    global _current
    _current = None
    Mode.json = "--json" in args

    def work() -> int:
        cli = build(_command_of(args))
        python_interrupts()
        try:
            result = cli(args=args, prog_name="dispatch", standalone_mode=False)
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
        return funnel(work)
    finally:
        if _current is not None and _current.app is not None:
            _current.app.close()


def _help_hint(exc: Exception) -> str | None:
    ctx = getattr(exc, "ctx", None)
    return f"see `{ctx.command_path} --help`" if ctx is not None else None
