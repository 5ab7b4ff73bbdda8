"""A nudge from the agent wrapper to the dispatcher waiting for it: "look now".

The database stays the only truth: a nudge carries nothing, and the dispatcher reads
the attempt when it gets one, and every so often without one. It only saves the wait
between two looks, which every `dispatch run` would otherwise spend. A Unix datagram
socket in Linux's abstract namespace (no file to leave behind); where there is none,
nobody listens and the dispatcher just looks every so often.
"""

from __future__ import annotations

import binascii
import contextlib
import os
import socket


def address(database: str, attempt_id: int) -> str:
    """The same name on both sides; attempt ids are only unique within one database."""
    digest = binascii.crc32(database.encode("utf-8", "surrogateescape"))
    return f"\0dispatch-wakeup-{os.getuid()}-{digest:08x}-{attempt_id}"


class Waiter:
    """The dispatcher's end: waits for a nudge, at most a given time."""

    def __init__(self, name: str) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(name)
        except OSError:
            self._socket.close()
            raise

    def wait(self, seconds: float) -> bool:
        """Whether a nudge came within `seconds` (all waiting ones are taken at once)."""
        self._socket.settimeout(max(seconds, 0.0))
        try:
            self._socket.recv(16)
        except (TimeoutError, BlockingIOError):
            return False
        except OSError:
            return False
        self._socket.setblocking(False)
        with contextlib.suppress(BlockingIOError, OSError):
            while self._socket.recv(16):
                pass
        return True

    def close(self) -> None:
        self._socket.close()


def listen(name: str) -> Waiter | None:
    """A waiter, or None where this system cannot have one (then the caller polls)."""
    if not hasattr(socket, "AF_UNIX") or not name.startswith("\0") or os.uname().sysname != "Linux":
        return None
    try:
        return Waiter(name)
    except OSError:
        return None  # taken (another database's attempt of the same id), or not allowed


def nudge(name: str) -> None:
    """Wake whoever waits on `name`; nobody waiting is fine."""
    if not hasattr(socket, "AF_UNIX"):
        return
    with (
        contextlib.suppress(OSError),
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender,
    ):
        sender.sendto(b"!", name)
