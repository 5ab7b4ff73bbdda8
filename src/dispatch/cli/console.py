"""The console script: the first of dispatch's modules a `dispatch` command runs.

Only the program imports it (never a test or a library user), because it changes how
the process answers Ctrl-C: while the CLI is still being imported, a Ctrl-C ends the
command at once with the same line and code as later, not with a traceback.
"""

from __future__ import annotations

# Both built in and loaded before any code runs: `signal` would build its enums first.
import _signal  # type: ignore[import-not-found]
import os


def _interrupted_early(_signum: int, _frame: object) -> None:
    os.write(2, b"dispatch: error: interrupted\n")
    os._exit(130)


if _signal.getsignal(_signal.SIGINT) is not _signal.SIG_IGN:  # started deaf to it: stay so
    _signal.signal(_signal.SIGINT, _interrupted_early)

# Python's own handler comes back once the command is about to run (entry.python_interrupts).
from dispatch.cli.entry import main

__all__ = ["main"]
