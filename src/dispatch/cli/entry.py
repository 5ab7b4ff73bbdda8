"""The console script's first stop, and the error funnel every command leaves through.

It imports no CLI framework: `--version` and the top-level `--help` answer at once,
and the `agent-exec` wrapper — which every `dispatch run` waits for — starts without
parsing machinery.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Callable
from typing import NoReturn

from dispatch import __version__
from dispatch.errors import DispatchError


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


def python_interrupts() -> None:
    """From here on a Ctrl-C is Python's KeyboardInterrupt, for the command to handle.

    Until then the console script's handler ends the process at once: a KeyboardInterrupt
    raised while modules are still being imported can surface as a traceback, or be
    "ignored" inside an import lock's callback and lost."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


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


def funnel(work: Callable[[], int]) -> int:
    """Run `work`; every error leaves as one line (no traceback unless DISPATCH_DEBUG=1)."""
    try:
        return work()
    except DispatchError as exc:
        report(exc)
        return exc.exit_code
    except KeyboardInterrupt:
        report(DispatchError("interrupted"))
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:
        report(DispatchError(f"{type(exc).__name__}: {exc}"))
        return 1


def report(exc: DispatchError) -> None:
    if os.environ.get("DISPATCH_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    from dispatch.cli.output import error

    error(exc)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):
            stream.flush()
