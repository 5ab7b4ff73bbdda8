"""The one error funnel every command leaves through: one line (or one JSON object) and
the spec's exit code, a traceback only with DISPATCH_DEBUG=1."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable

from dispatch.errors import DispatchError, ReaderGone


def funnel(work: Callable[[], int], *, json: bool = False) -> int:
    """Run `work`; every error leaves as one line (no traceback unless DISPATCH_DEBUG=1)."""
    try:
        return work()
    except DispatchError as exc:
        report(exc, json=json)
        return exc.exit_code
    except KeyboardInterrupt:
        report(DispatchError("interrupted"), json=json)
        return 130
    except (BrokenPipeError, ReaderGone):
        return 0
    except Exception as exc:
        if isinstance(exc.__cause__, KeyboardInterrupt):
            # A Ctrl-C while a class was being made (a dataclass's fields, at import)
            # comes out as Python's RuntimeError("Error calling __set_name__ …").
            report(DispatchError("interrupted"), json=json)
            return 130
        report(DispatchError(f"{type(exc).__name__}: {exc}"), json=json)
        return 1


def report(exc: DispatchError, *, json: bool = False) -> None:
    if os.environ.get("DISPATCH_DEBUG") == "1" and sys.exc_info()[0] is not None:
        import traceback

        traceback.print_exc()
    from dispatch.cli.output import error

    error(exc, json=json)


def python_interrupts() -> None:
    """From here on a Ctrl-C is Python's KeyboardInterrupt, for the command to handle.

    Until then the console script's handler ends the process at once: a KeyboardInterrupt
    raised while modules are still being imported can surface as a traceback, or be
    "ignored" inside an import lock's callback and lost."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
