"""An exclusive lock on a file, the kernel's `flock`: released when its holder dies, so
a killed process never leaves anything locked.

The standard library's call, not a package: every `dispatch run` takes a lock on its
way to the agent (around `git worktree add`), and importing a file-lock package cost
it about 30 ms, a tenth of the whole command.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from types import TracebackType

# How often a lock held by another process is tried again while a timeout runs.
POLL_SECONDS = 0.05


class LockHeld(TimeoutError):
    """The lock was still held by someone else when the timeout ran out: its own error,
    so that a caller's `except` cannot take a timeout from inside the locked work for it."""


class FileLock:
    """One lock file. Re-entrant in the thread that holds it, exclusive between the
    threads of a process and between processes; `timeout` < 0 waits as long as it takes
    (Ctrl-C still interrupts), else LockHeld once it has passed.

    Two objects for one file in one process exclude each other too: take one object
    per operation, or share it."""

    def __init__(self, path: str | os.PathLike[str], timeout: float = -1) -> None:
        self.path = os.fspath(path)
        self.timeout = timeout
        self._threads = threading.RLock()
        self._depth = 0
        self._fd: int | None = None

    def __enter__(self) -> FileLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def acquire(self) -> None:
        deadline = None if self.timeout < 0 else time.monotonic() + self.timeout
        if not self._threads.acquire(timeout=-1 if deadline is None else self.timeout):
            raise LockHeld(f"{self.path} is held by another thread")
        try:
            if self._depth == 0:
                self._fd = _take(self.path, deadline)
            self._depth += 1
        except BaseException:
            self._threads.release()
            raise

    def release(self) -> None:
        self._depth -= 1
        if self._depth == 0 and self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        self._threads.release()


def _take(path: str, deadline: float | None) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        if deadline is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            return fd
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeld(f"{path} is held by another process") from None
                time.sleep(POLL_SECONDS)
    except BaseException:
        os.close(fd)
        raise
