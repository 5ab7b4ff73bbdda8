"""The console script's first stop, and the error funnel every command leaves through.

It imports no CLI framework: `--version` and the top-level `--help` answer at once,
and the `agent-exec` wrapper — which every `dispatch run` waits for — starts without
parsing machinery.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import NoReturn

from dispatch import __version__
from dispatch.cli.funnel import funnel, python_interrupts


def main() -> NoReturn:
    """The console script: run, flush, and exit without interpreter teardown."""
    args = sys.argv[1:]
    try:
        code = _dispatch(args)
    except KeyboardInterrupt:
        # Ctrl-C before the funnel is in place (while the CLI is still being imported)
        # or after it (while closing): one line all the same, never a traceback.
        code = funnel(_interrupted)
    _flush()
    # Interpreter teardown of SQLAlchemy & co. costs ~150 ms: skip it, output is flushed.
    os._exit(code)


def _dispatch(args: list[str]) -> int:
    if args == ["--version"]:
        return _say(f"dispatch {__version__}")
    if args in (["--help"], ["-h"]) and _help_fits():
        from dispatch.cli.help_text import TOP_LEVEL

        sys.stdout.write(TOP_LEVEL)
        return 0
    if len(args) == 2 and args[0] == "agent-exec" and args[1].isdigit():
        python_interrupts()
        return funnel(lambda: _agent_exec(int(args[1])))
    from dispatch.cli.main import run

    return run(args)


def _interrupted() -> int:
    raise KeyboardInterrupt


def _help_fits() -> bool:
    """Whether typer would render the top-level help exactly as kept in `help_text`: it
    wraps to the terminal's width, capped at 80 columns."""
    import shutil

    return shutil.get_terminal_size().columns >= 80


def _say(text: str) -> int:
    sys.stdout.write(text + "\n")
    return 0


def _agent_exec(attempt_id: int) -> int:
    from dispatch.app import App
    from dispatch.config import load_settings
    from dispatch.services.wrapper import agent_exec

    app = App(load_settings())
    try:
        return agent_exec(app, attempt_id)
    finally:
        app.close()


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
